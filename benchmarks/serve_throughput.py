"""Serving throughput and latency: rayft (transformers engine) vs LLaMA-Factory's API, side by side.

Both servers get the same model, chat template (qwen), prompts and greedy sampling, one after the
other in one run, driven by the official `openai` client at concurrency 1 and 8. Reported per
row: completion tokens per second over the wall time, and p50/p95 request latency.

    python benchmarks/serve_throughput.py                       # tiny test model (built here)
    python benchmarks/serve_throughput.py --model saves/merged --requests 32 --max-tokens 128

LLaMA-Factory 0.9.5 runs from its own venv (``--lf-python``, default /work/lfvenv/bin/python) as
``llamafactory-cli api``, with ``torchaudio`` stubbed as tests/goldens/generate_lf_goldens.py
does (LF imports it unconditionally; text serving never calls it). Without that venv, its rows
are skipped. Figures depend on the machine and its load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PROMPTS = [
    "Who are you?",
    "Name three colours.",
    "Tell me a short story about a cat.",
    "What is two plus two?",
    "Describe the sea in one sentence.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
]
LF_STUB_SOURCE = REPO_ROOT / "tests" / "goldens" / "generate_lf_goldens.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, *, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


async def _measure(
    base_url: str, model: str, *, concurrency: int, requests: int, max_tokens: int
) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with limit:
            start = time.perf_counter()
            response = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens,
                temperature=0.0,
            )
            latencies.append(time.perf_counter() - start)
            tokens += response.usage.completion_tokens

    await one(0)  # warm-up, not counted
    latencies.clear()
    tokens = 0
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - start
    await client.close()
    ordered = sorted(latencies)
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "tokens": tokens,
    }


@contextmanager
def rayft_server(model: str, *, port: int) -> Iterator[tuple[str, str]]:
    """rayft's Serve app with the transformers engine and the qwen template."""
    from jobs.runtime import keep_loopback, local_ray

    keep_loopback()  # before Ray is imported: the private cluster listens on 127.0.0.1 only
    from ray import serve

    from data_pipelines.templates import get_template
    from serve import ServeArgs, run_server

    template = get_template("qwen")
    args = ServeArgs(
        model_path=model,
        model_name="rayft",
        chat_template=template.to_jinja(),
        stop_words=list(template.stop_words),
        engine="transformers",
        port=port,
        num_cpus_per_replica=1,
    )
    with local_ray(num_cpus=2):
        try:
            yield run_server(args, blocking=False), "rayft"
        finally:
            serve.shutdown()


@contextmanager
def llamafactory_server(model: str, *, port: int, lf_python: Path) -> Iterator[tuple[str, str]]:
    """``llamafactory-cli api`` (HF backend) in LF's venv, torchaudio stubbed."""
    sys.path.insert(0, str(LF_STUB_SOURCE.parent))
    from generate_lf_goldens import TORCHAUDIO_STUB

    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "stubs" / "torchaudio"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text(TORCHAUDIO_STUB, encoding="utf-8")
        config = Path(tmp) / "api.yaml"
        config.write_text(
            f"model_name_or_path: {model}\ntemplate: qwen\ninfer_backend: huggingface\n"
            "infer_dtype: float32\ntrust_remote_code: false\n"
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(stub.parent),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(port),
        }
        code = "import sys; from llamafactory.cli import main; sys.argv[0] = 'llamafactory-cli'; main()"
        proc = subprocess.Popen(
            [str(lf_python), "-c", code, "api", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout_s=300, proc=proc)
            yield f"http://127.0.0.1:{port}/v1", "llamafactory"
        except RuntimeError:
            print(proc.stderr.read()[-2000:] if proc.stderr else "", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _tiny_model(workdir: Path) -> str:
    from tests.fixtures.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(workdir / "tokenizer")
    return str(build_tiny_model(workdir / "model", tokenizer, arch="qwen2"))


def main(argv: list[str] | None = None) -> int:
    """Run every server in turn and print one row per server and concurrency."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=24, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lf-python", type=Path, default=Path("/work/lfvenv/bin/python"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _tiny_model(Path(tmp))
        servers = [("rayft (transformers)", lambda: rayft_server(model, port=_free_port()))]
        if args.lf_python.exists():
            servers.append(
                (
                    "LLaMA-Factory 0.9.5 api (HF)",
                    lambda: llamafactory_server(model, port=_free_port(), lf_python=args.lf_python),
                )
            )
        else:
            print(f"skipping LLaMA-Factory: {args.lf_python} not found")
        rows = []
        for name, start in servers:
            with start() as (base_url, served_name):
                for concurrency in (1, 8):
                    figures = asyncio.run(
                        _measure(
                            base_url,
                            served_name,
                            concurrency=concurrency,
                            requests=args.requests,
                            max_tokens=args.max_tokens,
                        )
                    )
                    rows.append((name, concurrency, figures))
                    print(name, concurrency, figures, flush=True)
    print(
        f"\nmodel: {args.model or 'tiny test model'}; {args.requests} requests, greedy, "
        f"max_tokens={args.max_tokens}"
    )
    print(f"{'server':32} {'conc':>4} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'tokens':>7}")
    for name, concurrency, f in rows:
        print(
            f"{name:32} {concurrency:>4} {f['tokens_per_s']:>8.1f} {f['p50_s']:>7.3f} "
            f"{f['p95_s']:>7.3f} {int(f['tokens']):>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
