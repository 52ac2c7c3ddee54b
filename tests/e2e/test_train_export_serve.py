"""YAML → Ray Data → Ray Train LoRA SFT (2 gloo workers) → merge → Ray Serve → openai client.

Everything is real: a private local Ray cluster, TorchTrainer workers, peft, a merged
safetensors export, and a Serve deployment answering the official `openai` client over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cluster.cli import main as rayft_main
from cluster.cli import serve_args_from_config
from data_pipelines.templates import get_template
from jobs.export import export_merged
from jobs.launch import run_training
from jobs.preflight import load_infer_config, load_run_config
from tests.fixtures.servers import free_loopback_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Give three tips for staying healthy."


@pytest.fixture(scope="module")
def trained(ray_cluster: float, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("e2e")
    path = work / "sft.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "template": "qwen",
                "dataset": "alpaca_en_demo",
                "dataset_dir": str(ROOT / "data"),
                "max_samples": 64,
                "cutoff_len": 128,
                "output_dir": str(work / "lora"),
                "export_dir": str(work / "merged"),
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "learning_rate": 5.0e-3,
                "num_train_epochs": 2,
                "logging_steps": 1,
                "save_steps": 4,
                "plot_loss": True,
                "report_to": "mlflow",
                "lora_rank": 8,
                "temperature": 0,
                "max_new_tokens": 12,
                "serve": {"port": free_loopback_port()},
                "ray": {"num_workers": 2},
            }
        )
    )
    config = load_run_config(path)
    outcome = run_training(config, total_cpus=ray_cluster)
    return path, config, outcome


def test_training_writes_llamafactory_outputs_and_loss_decreases(trained) -> None:
    _, config, outcome = trained
    out = Path(outcome.output_dir)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "all_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "rayft_config.yaml",
        "data_report.json",
        "mlflow.db",
    ):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log] == list(range(1, outcome.total_steps + 1))
    assert outcome.total_steps == 8  # 64 rows / 2 ranks / 4 per batch / 2 accumulation * 2 epochs
    assert set(log[0]) >= {"current_steps", "total_steps", "loss", "lr", "epoch", "elapsed_time"}
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < first - 0.05, f"loss did not decrease: {first} -> {last}"
    assert json.loads((out / "data_report.json").read_text())["kept"] == 64
    assert outcome.checkpoint_path is not None


def test_rerun_resumes_from_the_last_checkpoint(trained, ray_cluster: float) -> None:
    _, config, outcome = trained
    again = run_training(config, total_cpus=ray_cluster)
    log = (Path(outcome.output_dir) / "trainer_log.jsonl").read_text().splitlines()
    assert again.total_steps == outcome.total_steps
    assert len(log) == outcome.total_steps  # nothing retrained, the log kept


def test_merged_model_equals_base_plus_adapter(trained) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, config, outcome = trained
    merged_dir = export_merged(config)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2, 229]])
    base = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(outcome.output_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    assert (expected - actual).abs().max().item() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == get_template("qwen").to_jinja()
    assert tokenizer.eos_token == "<|im_end|>"


def test_served_answer_equals_rayft_chat(trained, capsys: pytest.CaptureFixture[str]) -> None:
    from openai import OpenAI
    from ray import serve as ray_serve

    from serve import run_server

    path, config, _ = trained
    merged = Path(config.export_dir)
    if not (merged / "config.json").is_file():
        export_merged(config)
    overrides = [f"model_name_or_path={merged}"]
    assert rayft_main(["chat", str(path), *overrides, "--prompt", PROMPT]) == 0
    chat_answer = capsys.readouterr().out.rstrip("\n")

    served = load_infer_config(path, overrides)
    args = serve_args_from_config(served, num_cpus_per_replica=0.5)
    base_url = run_server(args, blocking=False)
    try:
        assert base_url.startswith("http://127.0.0.1:")
        client = OpenAI(base_url=base_url, api_key="none")
        assert [m.id for m in client.models.list().data] == [args.model_name]
        reply = client.chat.completions.create(
            model=args.model_name, messages=[{"role": "user", "content": PROMPT}], temperature=0
        )
    finally:
        ray_serve.shutdown()
    assert reply.choices[0].message.content == chat_answer
    assert reply.usage.completion_tokens > 0
