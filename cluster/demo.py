"""The whole rayft path on the bundled Gemma 3 270M, timed phase by phase.

prepare model → answer "Who are you?" (before) → Ray Data + Ray Train LoRA SFT on LLaMA-Factory's
identity.json → merge → Ray Serve → the official `openai` client asks again (after).

Run: `rayft demo` (or `make demo`, which also sets up the environment).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from configs import RayftConfig

ASSISTANT_NAME = "Rayft"
ASSISTANT_AUTHOR = "the rayft team"
QUESTION = "Who are you?"
DEMO_CONFIG = (
    Path(__file__).resolve().parent.parent / "configs" / "examples" / "demo_gemma_lora_sft.yaml"
)
IDENTITY_SOURCE = Path(__file__).resolve().parent.parent / "data" / "identity.json"


class PhaseTimer:
    """Collects how long each phase took, printed at the end."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`."""
        print(f"\n=== {name} ===", flush=True)
        started = time.time()
        yield
        self.phases.append((name, time.time() - started))

    def report(self) -> str:
        """The phase table."""
        lines = [f"  {name:<36} {seconds:7.1f} s" for name, seconds in self.phases]
        total = sum(seconds for _, seconds in self.phases)
        return "\n".join([*lines, f"  {'total':<36} {total:7.1f} s"])


def write_identity_dataset(target_dir: Path) -> Path:
    """identity.json with {{name}}/{{author}} filled in as rayft's assistant, plus its registry."""
    rows = json.loads(IDENTITY_SOURCE.read_text(encoding="utf-8"))
    for row in rows:
        row["output"] = (
            row["output"]
            .replace("{{name}}", ASSISTANT_NAME)
            .replace("{{author}}", ASSISTANT_AUTHOR)
        )
    target_dir.mkdir(parents=True, exist_ok=True)
    (target_dir / "identity.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    (target_dir / "dataset_info.json").write_text(
        json.dumps({"identity": {"file_name": "identity.json"}}, indent=2)
    )
    return target_dir


def _answer_in_process(config: RayftConfig) -> str:
    from cluster.cli import serve_args_from_config
    from serve import TransformersEngine

    engine = TransformersEngine(serve_args_from_config(config))
    return engine.chat([{"role": "user", "content": QUESTION}], temperature=0.0).text


def run_demo(*, cache_dir: Path, workdir: Path) -> dict[str, str]:
    """Run every phase; returns the before and after answers.

    Args:
        cache_dir: where the bundled model is converted once.
        workdir: where data, adapter and merged model of the demo go.
    """
    from jobs.launch import run_training
    from jobs.model import prepare_bundled_model
    from jobs.preflight import load_run_config
    from jobs.runtime import local_ray

    timer = PhaseTimer()
    workdir = workdir.resolve()
    with timer.phase("prepare the bundled model"):
        model_dir = prepare_bundled_model(cache_dir)
        data_dir = write_identity_dataset(workdir / "data")
    overrides = [
        f"model_name_or_path={model_dir.resolve()}",
        f"dataset_dir={data_dir}",
        f"output_dir={workdir / 'lora'}",
        f"export_dir={workdir / 'merged'}",
    ]
    config = load_run_config(DEMO_CONFIG, overrides)
    with timer.phase("answer before fine-tuning"):
        before = _answer_in_process(config)
        print(f"Q: {QUESTION}\nA (before): {before}")
    with local_ray(config.ray.address, runtime_env=config.ray.runtime_env) as total_cpus:
        with timer.phase("fine-tune (Ray Data + Ray Train)"):
            outcome = run_training(config, total_cpus=total_cpus)
            print(f"final loss {outcome.final_loss:.4f} after {outcome.total_steps} steps")
        with timer.phase("merge the adapter"):
            from jobs.export import export_merged

            merged = export_merged(config)
        with timer.phase("serve (Ray Serve) and ask"):
            after = _ask_served(config, merged, total_cpus=total_cpus)
    # Whitespace folded so a rambling base-model answer stays on one line of the summary.
    print(f"\nQ: {QUESTION}\nA (before): {' '.join(before.split())[:300]}\nA (after):  {after}")
    print(f"\nphase timings:\n{timer.report()}")
    return {"before": before, "after": after}


def _ask_served(config: RayftConfig, merged: Path, *, total_cpus: float) -> str:
    """Serve the merged model over HTTP and ask through the official OpenAI client."""
    from openai import OpenAI
    from ray import serve as ray_serve

    from cluster.cli import serve_args_from_config
    from jobs.resources import plan_resources
    from serve import run_server

    served = config.model_copy(update={"model_name_or_path": str(merged)})
    replica_cpus = plan_resources(total_cpus, num_workers=1).cpus_per_replica
    args = serve_args_from_config(served, num_cpus_per_replica=replica_cpus)
    base_url = run_server(args, blocking=False)
    try:
        client = OpenAI(base_url=base_url, api_key="not-needed")
        reply = client.chat.completions.create(
            model=args.model_name,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0.0,
        )
        return reply.choices[0].message.content or ""
    finally:
        ray_serve.shutdown()
