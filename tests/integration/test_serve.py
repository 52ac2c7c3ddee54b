"""The OpenAI server on a real local Ray cluster, driven by the official `openai` client.

One private Ray cluster and one Serve instance per module, with two applications on the same
127.0.0.1 proxy: the tiny base model at ``/`` and base + a LoRA adapter at ``/lora``. Every
answer is compared with `TransformersEngine` run in this process, which is what ``rayft chat``
uses, so "served" and "in-process" cannot drift apart.

Run: ``python -m pytest tests/integration/test_serve.py -x -q``
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from cluster.runtime import local_ray
from serve import ServeArgs, TransformersEngine, run_server
from serve.engine import ChatTemplateMissingError

pytestmark = pytest.mark.ray

# The tiny tokenizer ships no chat template (on purpose), so the served template is explicit,
# exactly as a training template's Jinja export would be.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
]
GREEDY = {"temperature": 0.0, "max_tokens": 16}


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random non-zero B, so that it really changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # peft's default zero-inits B: the adapter would be a no-op
    )
    out = tmp_path_factory.mktemp("lora")
    get_peft_model(base, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def base_args(tiny_model_dir: Path) -> ServeArgs:
    return ServeArgs(
        model_path=str(tiny_model_dir),
        model_name="tiny",
        chat_template=CHATML,
        stop_words=["<|im_end|>"],
        max_new_tokens=32,
        port=_free_loopback_port(),
        num_cpus_per_replica=0.5,
    )


@pytest.fixture(scope="module")
def lora_args(base_args: ServeArgs, adapter_dir: Path) -> ServeArgs:
    return ServeArgs(
        **{
            **base_args.model_dump(),
            "adapter_path": str(adapter_dir),
            "model_name": "tiny-lora",
            "route_prefix": "/lora",
        }
    )


@pytest.fixture(scope="module")
def urls(base_args: ServeArgs, lora_args: ServeArgs) -> Iterator[dict[str, str]]:
    """Base URLs of both applications, served from one private Ray cluster."""
    from ray import serve

    with local_ray(num_cpus=2):
        try:
            # The first run_server starts Serve's proxy on base_args.port; the second reuses it.
            yield {
                "tiny": run_server(base_args, blocking=False),
                "tiny-lora": run_server(lora_args, blocking=False),
            }
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(urls: dict[str, str]) -> OpenAI:
    return OpenAI(base_url=urls["tiny"], api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lora_client(urls: dict[str, str]) -> OpenAI:
    return OpenAI(base_url=urls["tiny-lora"], api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(base_args: ServeArgs) -> TransformersEngine:
    return TransformersEngine(base_args)


@pytest.fixture(scope="module")
def lora_engine(lora_args: ServeArgs) -> TransformersEngine:
    return TransformersEngine(lora_args)


def test_run_server_returns_loopback_v1_url(urls: dict[str, str], base_args: ServeArgs) -> None:
    assert urls["tiny"] == f"http://127.0.0.1:{base_args.port}/v1"
    assert urls["tiny-lora"] == f"http://127.0.0.1:{base_args.port}/lora/v1"


def test_health(urls: dict[str, str]) -> None:
    with urllib.request.urlopen(urls["tiny"].removesuffix("/v1") + "/health", timeout=10) as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/completions", 404), ("GET", "/v1/chat/completions", 405)],
)
def test_unknown_routes_answer_with_openai_error_bodies(
    urls: dict[str, str], method: str, path: str, status: int
) -> None:
    request = urllib.request.Request(urls["tiny"].removesuffix("/v1") + path, method=method)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == status
    body = json.loads(err.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert path in body["error"]["message"]


def test_models_lists_the_served_name(client: OpenAI, lora_client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert [m.id for m in lora_client.models.list().data] == ["tiny-lora"]


def test_greedy_answer_equals_in_process_engine(client: OpenAI, engine: TransformersEngine) -> None:
    expected = engine.chat(MESSAGES, **GREEDY)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    choice = response.choices[0]
    assert expected.text  # a non-empty answer, or equality would prove little
    assert choice.message.content == expected.text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    assert response.model == "tiny"
    assert response.object == "chat.completion"


def test_usage_counts_rendered_prompt_and_generated_tokens(
    client: OpenAI, engine: TransformersEngine, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rendered = tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, chat_template=CHATML
    )
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected = engine.chat(MESSAGES, **GREEDY)

    usage = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY).usage
    assert usage.prompt_tokens == len(prompt_ids) == expected.prompt_tokens
    assert usage.completion_tokens == len(expected.completion_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("budget_field", ["max_tokens", "max_completion_tokens"])
def test_budget_reached_finishes_with_length(client: OpenAI, budget_field: str) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0.0, **{budget_field: 3}
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_stop_string_trims_the_answer(client: OpenAI, engine: TransformersEngine) -> None:
    full = engine.chat(MESSAGES, temperature=0.0, max_tokens=24).text
    # A stop string from inside the greedy answer, first occurring after its start.
    stop = next(
        full[i : i + 3]
        for i in range(1, len(full) - 3)
        if full[i : i + 3].isalpha() and full.find(full[i : i + 3]) == i
    )
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0.0, max_tokens=24, stop=[stop]
    )
    choice = response.choices[0]
    assert choice.message.content == full[: full.find(stop)]
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens < 24
    in_process = engine.chat(MESSAGES, temperature=0.0, max_tokens=24, stop=[stop])
    assert (choice.message.content, response.usage.completion_tokens) == (
        in_process.text,
        in_process.completion_tokens,
    )


def test_seeded_sampling_is_reproducible(client: OpenAI, engine: TransformersEngine) -> None:
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 12}
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, **sampling)
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, **sampling)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content == engine.chat(MESSAGES, **sampling).text


def test_concurrent_requests_do_not_corrupt_each_other(
    client: OpenAI, engine: TransformersEngine
) -> None:
    conversations = [[{"role": "user", "content": text}] for text in ("Hi", "Who are you?", "2+2")]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        response = client.chat.completions.create(model="tiny", messages=conversations[i], **GREEDY)
        answers[i] = response.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {i: engine.chat(c, **GREEDY).text for i, c in enumerate(conversations)}


def test_n_above_one_is_a_400_naming_n(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    assert err.value.param == "n"
    assert "n=2 is not supported" in err.value.message


def test_streaming_is_a_400_not_a_fake_stream(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
    assert err.value.param == "stream"
    assert "streaming is not supported yet" in err.value.message


def test_invalid_fields_are_400s_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "robot", "content": "beep"}]
        )
    assert err.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature="hot")
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert err.value.param == "max_tokens"
    assert "context window" in err.value.message


def test_unknown_model_is_a_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    assert "'tiny'" in err.value.message


def test_lora_answer_equals_in_process_engine_with_the_adapter(
    lora_client: OpenAI, lora_engine: TransformersEngine, engine: TransformersEngine
) -> None:
    expected = lora_engine.chat(MESSAGES, **GREEDY)
    assert expected.text != engine.chat(MESSAGES, **GREEDY).text  # the adapter is live
    response = lora_client.chat.completions.create(model="tiny-lora", messages=MESSAGES, **GREEDY)
    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == expected.completion_tokens


def test_missing_chat_template_is_a_clear_error(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(ServeArgs(model_path=str(tiny_model_dir)))
    with pytest.raises(ChatTemplateMissingError, match="has no chat template"):
        engine.chat(MESSAGES, **GREEDY)
