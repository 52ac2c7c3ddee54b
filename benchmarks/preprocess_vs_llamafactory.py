"""rayft's Ray Data preprocessing against LLaMA-Factory 0.9.5's, same data, tokenizer, template.

Builds N alpaca rows (the demo rows repeated with variations), then times, end to end from a
fresh process (Ray start-up included for rayft), `rayft preprocess` and LLaMA-Factory's
`get_dataset` with the same number of worker processes, and prints rows/s, tokens/s and the
ratio. A last line gives the floor of any Ray pipeline on this machine, measured in the same
run: starting a private cluster, one worker process loading the tokenizer, and the bare Rust
encoding of each row's prompt and response spread perfectly over every CPU; no Python per
row, no reading or writing. When it exceeds half of LLaMA-Factory's time, 2x is out of reach
here whatever the pipeline does. The line after it times rayft's own per-row work (parse,
template, tokenize, write parquet) in as many plain processes, with no Ray at all
(`plain_processes.py`): what a perfect orchestration of that work would take.

With `--rayft-only --rows 10000,100000,1000000` it reports rayft's peak memory per size
instead, to show it stays flat: the summed RSS of the whole process tree (Ray workers
included), the summed PSS (shared pages split between the processes mapping them, so an
object-store block or a library counts once) and, at the PSS peak, each kind of process's share;
add `--rayft-workers 2` to give every size the same tokenizing pool (rayft starts small inputs
on one actor, which alone makes the 10k figure ~0.5 GiB lower). Only this mode polls memory:
the polling takes CPU from the run, and LLaMA-Factory's timed run is not polled.

    .venv/bin/python benchmarks/preprocess_vs_llamafactory.py --rows 100000
    .venv/bin/python benchmarks/preprocess_vs_llamafactory.py --rayft-only --rows 10000,1000000

Needs the LLaMA-Factory venv at /work/lfvenv (see tests/goldens/README.md) for the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# Rows whose texts the floor reads and encodes at a time (see `encode_floor`).
FLOOR_CHUNK_ROWS = 10_000
LF_PYTHON = Path("/work/lfvenv/bin/python")


def build_rows(n: int, folder: Path) -> Path:
    """N alpaca rows: the demo rows cycled, each with its index, so no two are identical."""
    base = json.loads((ROOT / "data" / "alpaca_en_demo.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "bench.jsonl").open("w") as out:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["instruction"] = f"{row['instruction']} (variant {i})"
            out.write(json.dumps(row) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.jsonl"}}))
    return folder


class PeakMemory:
    """Polls the memory of a process and all its descendants (Ray's workers included).

    Two sums: RSS, which counts a shared page (a library, an object-store block) once in every
    process that maps it, and PSS, which splits it between them, so the PSS sum is what the tree
    takes from the machine. At the PSS peak it keeps each process's share, by process title.
    """

    def __init__(self, pid: int) -> None:
        self.peak_rss = 0
        self.peak_pss = 0
        self.at_peak: dict[str, tuple[int, int]] = {}
        self._root = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            sample: dict[str, tuple[int, int]] = {}
            rss = pss = 0
            for proc in [self._root, *self._safe_children()]:
                try:
                    info = proc.memory_full_info()
                    title = " ".join(proc.cmdline()[:1])[-40:] or proc.name()
                except psutil.Error:
                    continue
                count, shared = sample.get(title, (0, 0))
                sample[title] = (count + 1, shared + info.pss)
                rss += info.rss
                pss += info.pss
            self.peak_rss = max(self.peak_rss, rss)
            if pss > self.peak_pss:
                self.peak_pss, self.at_peak = pss, sample
            time.sleep(0.2)

    def _safe_children(self) -> list[psutil.Process]:
        try:
            return self._root.children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def breakdown(self) -> str:
        """The PSS at the peak by process title, largest first."""
        rows = sorted(self.at_peak.items(), key=lambda item: -item[1][1])
        return "; ".join(f"{title} ×{n}: {pss / 2**20:.0f} MiB" for title, (n, pss) in rows)


def run_rayft(
    data_dir: Path,
    tokenizer: Path,
    work: Path,
    *,
    template: str,
    cutoff: int,
    workers: int | None = None,
    measure_memory: bool = False,
) -> dict:
    """Time `rayft preprocess` from a fresh process; with `measure_memory`, also poll its
    process tree's memory (not in speed runs: reading every process's smaps five times a
    second takes CPU from the run on a 2-core host, and LLaMA-Factory's run is not polled)."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "bench.yaml"
    config.write_text(
        "\n".join(
            [
                f"model_name_or_path: {tokenizer}",
                f"template: {template}",
                "dataset: bench",
                f"dataset_dir: {data_dir}",
                f"cutoff_len: {cutoff}",
                f"output_dir: {work / 'out'}",
                f"tokenized_cache_dir: {work / 'cache'}",
                *([f"preprocessing_num_workers: {workers}"] if workers else []),
            ]
        )
    )
    out = work / "tokenized"
    started = time.time()
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/rayft"), "preprocess", str(config), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    memory = PeakMemory(proc.pid) if measure_memory else None
    log, _ = proc.communicate()
    if memory is not None:
        memory.stop()
    seconds = time.time() - started
    if proc.returncode:
        raise SystemExit(f"rayft preprocess failed:\n{log[-3000:]}")
    table = pq.read_table(out / "data", columns=["input_ids", "skip_reason"])
    # Counted in Arrow: a million rows as Python lists would take more memory than the run.
    kept = table.filter(pc.equal(table["skip_reason"], ""))
    tokens = pc.sum(pc.list_value_length(kept["input_ids"])).as_py() or 0
    return {
        "rows": kept.num_rows,
        "tokens": tokens,
        "seconds": seconds,
        "memory": memory,
        "config": config,
    }


def run_llamafactory(
    data_dir: Path, tokenizer: Path, *, template: str, cutoff: int, workers: int
) -> dict:
    done = subprocess.run(
        [
            str(LF_PYTHON),
            str(ROOT / "benchmarks/lf_preprocess.py"),
            "--tokenizer",
            str(tokenizer),
            "--dataset-dir",
            str(data_dir),
            "--template",
            template,
            "--cutoff-len",
            str(cutoff),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode:
        raise SystemExit(f"LLaMA-Factory failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def encode_floor(data_dir: Path, tokenizer: Path) -> float:
    """CPU seconds one process spends in `tokenizers`' encode of every row's prompt and
    response text alone: work any implementation with this tokenizer must do (the template's
    own text and all bookkeeping come on top), so it bounds what parallel workers can reach.

    The texts are encoded `FLOOR_CHUNK_ROWS` rows at a time as they are read: with all 2M texts
    of 1M rows held at once the same encodes took 2.6x the CPU (432 against 166 CPU-s), which
    made the floor exceed rayft's own run."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))

    def encode(texts: list[str]) -> float:
        started = time.process_time()
        for text in texts:  # the cheapest call for one text, the one rayft makes
            backend.encode_batch_fast([text], add_special_tokens=False)
        return time.process_time() - started

    seconds, texts = 0.0, []
    with (data_dir / "bench.jsonl").open() as rows:
        for line in rows:
            row = json.loads(line)
            texts += ["\n".join(filter(None, (row["instruction"], row["input"]))), row["output"]]
            if len(texts) >= 2 * FLOOR_CHUNK_ROWS:
                seconds, texts = seconds + encode(texts), []
    return seconds + encode(texts)


RAY_START = """
import time
started = time.perf_counter()
from jobs.runtime import local_ray
with local_ray():
    print(time.perf_counter() - started)
"""


TOKENIZER_LOAD = """
import sys, time
started = time.perf_counter()
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])
print(time.perf_counter() - started)
"""


def fresh_python_seconds(*argv: str) -> float:
    """Seconds a fresh interpreter of rayft's venv reports for `argv` (its output's last word)."""
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return float(done.stdout.split()[-1])


def plain_processes_line(config: Path, data_dir: Path, work: Path, cpus: int) -> str:
    """The time of rayft's own per-row work (parse, template, tokenize, write) in `cpus` plain
    processes, no Ray (`benchmarks/plain_processes.py`): what a perfect orchestration of it
    would take."""
    seconds = fresh_python_seconds(
        str(ROOT / "benchmarks/plain_processes.py"),
        str(config),
        str(data_dir / "bench.jsonl"),
        str(work),
        f"--processes={cpus}",
    )
    return f"{'':14}rayft's per-row work alone in {cpus} plain processes (no Ray): {seconds:.1f} s"


def floor_line(data_dir: Path, tokenizer: Path, cpus: int, lf_seconds: float) -> str:
    """What 2x LLaMA-Factory would need, next to the least any Ray pipeline can take here."""
    encode = encode_floor(data_dir, tokenizer)
    ray_start = fresh_python_seconds("-c", RAY_START)
    worker_start = fresh_python_seconds("-c", TOKENIZER_LOAD, str(tokenizer))
    floor = encode / cpus + ray_start + worker_start
    return (
        f"{'':14}floor of any Ray pipeline here: starting Ray {ray_start:.1f} s + a worker "
        f"loading the tokenizer {worker_start:.1f} s + encoding the texts alone "
        f"{encode:.1f} CPU-s / {cpus} CPUs = {floor:.1f} s; 2x LLaMA-Factory needs "
        f"<= {lf_seconds / 2:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="100000", help="comma list of dataset sizes")
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument(
        "--workers", type=int, default=2, help="LLaMA-Factory preprocessing_num_workers"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer dir (default: the test tokenizer)"
    )
    parser.add_argument("--rayft-only", action="store_true")
    parser.add_argument(
        "--rayft-workers",
        type=int,
        help="rayft's preprocessing_num_workers (default: its own choice, one actor for small "
        "inputs); fix it to compare memory across sizes with the same pool",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = args.tokenizer
        if tokenizer is None:
            sys.path.insert(0, str(ROOT))
            from tests.fixtures.tiny import build_tiny_tokenizer

            tokenizer = build_tiny_tokenizer(tmp / "tokenizer")
        for n in (int(x) for x in args.rows.split(",")):
            data = build_rows(n, tmp / f"data{n}")
            # Each timed run starts with nothing left to write back: the kernel flushing the
            # fresh data file (or the other side's output) costs the run under way CPU.
            os.sync()
            ours = run_rayft(
                data,
                tokenizer,
                tmp / f"rayft{n}",
                template=args.template,
                cutoff=args.cutoff_len,
                workers=args.rayft_workers,
                measure_memory=args.rayft_only,
            )
            line = (
                f"rows={n:>8}  rayft: {ours['seconds']:7.1f} s  {ours['rows'] / ours['seconds']:9.0f} rows/s  "
                f"{ours['tokens'] / ours['seconds']:11.0f} tok/s"
            )
            if args.rayft_only:
                memory = ours["memory"]
                line += (
                    f"  peak RSS {memory.peak_rss / 2**30:5.2f} GiB  peak PSS {memory.peak_pss / 2**30:5.2f} GiB"
                    f"\n{'':14}PSS at its peak: {memory.breakdown()}"
                )
            if not args.rayft_only:
                os.sync()
                theirs = run_llamafactory(
                    data,
                    tokenizer,
                    template=args.template,
                    cutoff=args.cutoff_len,
                    workers=args.workers,
                )
                assert theirs["tokens"] == ours["tokens"], (theirs, ours)
                line += (
                    f"\n{'':14}LLaMA-Factory: {theirs['seconds']:7.1f} s  {theirs['rows'] / theirs['seconds']:9.0f} rows/s  "
                    f"{theirs['tokens'] / theirs['seconds']:11.0f} tok/s\n{'':14}speed-up: {theirs['seconds'] / ours['seconds']:.2f}x "
                    f"(same {ours['tokens']} tokens)\n"
                    + floor_line(data, tokenizer, psutil.cpu_count() or 1, theirs["seconds"])
                    + "\n"
                    + plain_processes_line(
                        ours["config"], data, tmp / f"plain{n}", psutil.cpu_count() or 1
                    )
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
