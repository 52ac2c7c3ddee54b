"""`rayft chat`: answers stream as they are generated, history is kept, and LF's serving keys map.

No Ray: the chat command runs the engine in this process.
"""

from __future__ import annotations

import builtins
import io
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import main, serve_args_from_config
from configs import ConfigError, load_config


class _Writes(io.StringIO):
    """stdout that remembers each write, to see text arrive piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def chat_config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.yaml"
    fields = {
        "model_name_or_path": str(tiny_model_dir),
        "template": "qwen",
        "temperature": 0.0,
        "max_new_tokens": 16,
        "serve": {"engine": "transformers"},
    }
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def engine(chat_config: Path):  # noqa: ANN201
    from serve import TransformersEngine

    return TransformersEngine(serve_args_from_config(load_config(chat_config)))


def test_prompt_answer_streams_and_equals_the_engine(
    chat_config: Path,
    engine,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", str(chat_config), "--prompt", "Hi"]) == 0
    expected = engine.chat([{"role": "user", "content": "Hi"}]).text
    assert expected
    assert out.getvalue() == expected + "\n"
    assert len([w for w in out.writes if w]) > 2  # printed piece by piece, not at the end


def test_interactive_chat_keeps_history(
    chat_config: Path,
    engine,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    lines = iter(["Hi", "And then?", "exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", str(chat_config)]) == 0
    first = engine.chat([{"role": "user", "content": "Hi"}]).text
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    second = engine.chat(history).text
    assert second != engine.chat([history[-1]]).text  # the history changes the answer
    assert f"Assistant: {first}\n" in out.getvalue()
    assert out.getvalue().endswith(f"Assistant: {second}\n")


def test_llamafactory_serving_keys_map_to_the_engine(chat_config: Path) -> None:
    config = load_config(
        chat_config,
        [
            "serve.engine=auto",
            "infer_backend=vllm",
            "vllm_maxlen=256",
            "vllm_gpu_util=0.5",
            "vllm_enforce_eager=true",
        ],
    )
    args = serve_args_from_config(config)
    assert (args.engine, args.max_model_len, args.gpu_memory_utilization, args.enforce_eager) == (
        "vllm",
        256,
        0.5,
        True,
    )
    assert (args.tool_format, args.stop_words) == ("qwen", ["<|im_end|>"])
    hf = serve_args_from_config(
        load_config(chat_config, ["serve.engine=auto", "infer_backend=huggingface"])
    )
    assert hf.engine == "transformers"


def test_contradicting_serving_keys_are_errors(chat_config: Path) -> None:
    config = load_config(
        chat_config, ["infer_backend=vllm", "serve.max_model_len=128", "vllm_maxlen=256"]
    )
    with pytest.raises(ConfigError) as err:
        serve_args_from_config(config)
    message = str(err.value)
    assert "`infer_backend`: contradicts `serve.engine: transformers`" in message
    assert "`vllm_maxlen`: contradicts `serve.max_model_len: 128`" in message


def test_serve_section_keys_reach_the_server_args(chat_config: Path) -> None:
    config = load_config(
        chat_config,
        [
            "serve.adapters={b: /tmp/adapter-b}",
            "serve.dtype=bfloat16",
            "serve.resources_per_replica={GPU: 1}",
            "serve.max_queued_requests=8",
            "serve.autoscaling={max_replicas: 2, upscale_delay_s: 1, downscale_delay_s: 5}",
        ],
    )
    args = serve_args_from_config(config)
    assert args.adapters == {"b": "/tmp/adapter-b"}
    assert (args.dtype, args.resources_per_replica, args.max_queued_requests) == (
        "bfloat16",
        {"GPU": 1.0},
        8,
    )
    assert (args.autoscaling.upscale_delay_s, args.autoscaling.downscale_delay_s) == (1.0, 5.0)
    assert set(args.served_models()) == {args.model_name, "b"}
