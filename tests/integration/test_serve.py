"""The OpenAI server on a real local Ray cluster, driven by the official `openai` client.

One Serve instance on the session's private Ray cluster for this module, test_serve_chunks.py
and test_serve_errors.py (which import these fixtures; they are collected right after this
module), with four applications on the same
127.0.0.1 proxy: the tiny base model at ``/``, base + a LoRA adapter at ``/lora`` (plus a second
adapter served under its own name: multi-LoRA), the base model behind API keys and request
limits at ``/secure``, and at ``/tools`` a tiny model taught to call a tool, served with the qwen
training template. Every answer is compared with `TransformersEngine` run in this
process, which is what ``rayft chat`` uses, so "served" and "in-process" cannot drift apart.

Run: ``python -m pytest tests/integration/test_serve.py -x -q``
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from serve import ServeArgs, TransformersEngine, run_server
from serve.engine import ChatTemplateMissingError
from tests.fixtures.servers import free_loopback_port

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
FILE_KEY = "sk-file-key"
ENV_KEYS = ("sk-env-one", "sk-env-two")
KEYS_ENV_VAR = "RAYFT_TEST_SERVE_KEYS"
# Set at import (collection), before any test starts Ray: Ray's workers, the replicas among
# them, inherit this process's environment as it was when Ray started.
os.environ[KEYS_ENV_VAR] = ",".join(ENV_KEYS)
_RUNNING: dict = {}  # while the applications run: their URLs and what shuts them down


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random non-zero B, so that it really changes the answers."""
    return _random_adapter(tiny_model_dir, tmp_path_factory, seed=1)


@pytest.fixture(scope="session")
def second_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another adapter, served next to the first under its own model name."""
    return _random_adapter(tiny_model_dir, tmp_path_factory, seed=2)


def _random_adapter(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, *, seed: int
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
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


@pytest.fixture(scope="session")
def base_args(tiny_model_dir: Path) -> ServeArgs:
    return ServeArgs(
        model_path=str(tiny_model_dir),
        model_name="tiny",
        chat_template=CHATML,
        stop_words=["<|im_end|>"],
        max_new_tokens=32,
        port=free_loopback_port(),
        num_cpus_per_replica=0.5,
    )


@pytest.fixture(scope="session")
def lora_args(base_args: ServeArgs, adapter_dir: Path, second_adapter_dir: Path) -> ServeArgs:
    return ServeArgs(
        **{
            **base_args.model_dump(),
            "adapter_path": str(adapter_dir),
            "adapters": {"tiny-lora-b": str(second_adapter_dir)},
            "model_name": "tiny-lora",
            "route_prefix": "/lora",
        }
    )


# The tool-calling app: a tiny model trained (in a few seconds) to answer one prompt with a
# qwen-format tool call, so the whole path runs for real: tools rendered by the training
# template's Jinja export, generated call parsed back into `tool_calls`.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_CALL_TEXT = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


def _qwen_serving_fields() -> dict:
    from data_pipelines.templates import get_template

    template = get_template("qwen")
    return {
        "chat_template": template.to_jinja(),
        "stop_words": list(template.stop_words),
        "tool_format": template.tools.name,
    }


@pytest.fixture(scope="session")
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model overfit to answer TOOL_QUESTION (with WEATHER_TOOL) by TOOL_CALL_TEXT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.engine import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    builder = PromptBuilder(
        ServeArgs(model_path=str(tiny_model_dir), **_qwen_serving_fields()),
        tokenizer,
        context_window=None,
    )
    prompt = builder.encode_chat(TOOL_QUESTION, [WEATHER_TOOL])
    answer = tokenizer.encode(TOOL_CALL_TEXT + "<|im_end|>", add_special_tokens=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):  # about 80 steps on an idle CPU
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("tool_model")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tool_args(base_args: ServeArgs, tool_model_dir: Path) -> ServeArgs:
    return ServeArgs(
        **{
            **base_args.model_dump(),
            "model_path": str(tool_model_dir),
            "model_name": "tiny-tools",
            "route_prefix": "/tools",
            "max_new_tokens": 64,  # the call is 36 tokens
            **_qwen_serving_fields(),
        }
    )


@pytest.fixture(scope="session")
def secure_args(base_args: ServeArgs, tmp_path_factory: pytest.TempPathFactory) -> ServeArgs:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# serving keys\n{FILE_KEY}\n\n")
    return ServeArgs(
        **{
            **base_args.model_dump(),
            "model_name": "tiny-secure",
            "route_prefix": "/secure",
            "api_keys_file": str(keys_file),
            "api_keys_env": KEYS_ENV_VAR,
            "max_request_bytes": 2_000,
            "max_tokens_limit": 8,
            "max_new_tokens": 8,
        }
    )


@pytest.fixture(scope="module")
def urls(
    request: pytest.FixtureRequest,
    ray_cluster: float,
    base_args: ServeArgs,
    lora_args: ServeArgs,
    secure_args: ServeArgs,
    tool_args: ServeArgs,
) -> Iterator[dict[str, str]]:
    """Base URLs of all applications, served on the session's private Ray cluster.

    test_serve_chunks.py and test_serve_errors.py import this fixture, so each module has its
    own copy: a copy reuses the running applications (`_RUNNING`), and the last module of a run
    of modules that need them shuts Serve down, so that the next module gets the CPUs back and
    can start Serve with its own settings.
    """
    if not _RUNNING:
        _RUNNING["stack"] = stack = contextlib.ExitStack()
        stack.callback(_serve_shutdown)
        # The first run_server starts Serve's proxy on base_args.port; later ones reuse it.
        _RUNNING["urls"] = {
            "tiny": run_server(base_args, blocking=False),
            "tiny-lora": run_server(lora_args, blocking=False),
            "tiny-secure": run_server(secure_args, blocking=False),
            "tiny-tools": run_server(tool_args, blocking=False),
        }
    try:
        yield _RUNNING["urls"]
    finally:
        if not _next_module_needs_them(request):
            _RUNNING.pop("stack").close()
            _RUNNING.clear()


def _serve_shutdown() -> None:
    from ray import serve

    serve.shutdown()


def _next_module_needs_them(request: pytest.FixtureRequest) -> bool:
    """Whether the test collected right after this module uses the running applications.

    Only the very next test counts: a module in between may start Serve with other settings.
    """
    items = request.session.items
    last = max(i for i, item in enumerate(items) if item.module is request.module)
    return last + 1 < len(items) and "urls" in getattr(items[last + 1], "fixturenames", ())


@pytest.fixture(scope="module")
def client(urls: dict[str, str]) -> OpenAI:
    return OpenAI(base_url=urls["tiny"], api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lora_client(urls: dict[str, str]) -> OpenAI:
    return OpenAI(base_url=urls["tiny-lora"], api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def engine(base_args: ServeArgs) -> TransformersEngine:
    return TransformersEngine(base_args)


@pytest.fixture(scope="session")
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
    [
        ("GET", "/v1/embeddings", 404),
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/completions", 405),
    ],
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


def test_models_lists_the_served_names(client: OpenAI, lora_client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert [m.id for m in lora_client.models.list().data] == ["tiny-lora", "tiny-lora-b"]


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


def test_concurrent_requests_are_batched_and_equal_sequential_answers(
    client: OpenAI,
) -> None:
    # Different prompt lengths: the batch is left-padded, which must not change greedy answers.
    prompts = ["Hi", "Who are you? Tell me about yourself.", "2+2", "Name three colours, please."]
    budgets = [16, 12, 5, 16]

    def ask(i: int) -> str:
        response = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompts[i]}],
            temperature=0.0,
            max_tokens=budgets[i],
        )
        return response.choices[0].message.content

    sequential = [ask(i) for i in range(len(prompts))]
    together: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))

    def ask_together(i: int) -> None:
        barrier.wait()
        together[i] = ask(i)

    threads = [threading.Thread(target=ask_together, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [together[i] for i in range(len(prompts))] == sequential


def test_n_greedy_choices_are_identical(client: OpenAI, engine: TransformersEngine) -> None:
    expected = engine.chat(MESSAGES, **GREEDY)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert {c.message.content for c in response.choices} == {expected.text}
    assert response.usage.prompt_tokens == expected.prompt_tokens  # the prompt counts once
    assert response.usage.completion_tokens == 3 * expected.completion_tokens


def test_n_seeded_samples_reproduce(client: OpenAI) -> None:
    sampling = {"temperature": 1.0, "seed": 11, "max_tokens": 10, "n": 3}
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, **sampling)
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, **sampling)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # n samples, not one sample copied
    assert 3 <= first.usage.completion_tokens <= 3 * 10  # summed over the choices


def test_n_with_stream_is_a_400_naming_n(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, stream=True)
    assert err.value.param == "n"
    assert "stream" in err.value.message


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


def test_each_adapter_answers_under_its_own_name(
    lora_client: OpenAI,
    lora_engine: TransformersEngine,
    lora_args: ServeArgs,
    second_adapter_dir: Path,
) -> None:
    # In process: only the second adapter on the base weights, so the served multi-LoRA
    # replica's answer is compared with an engine that never saw adapter switching.
    alone = TransformersEngine(
        ServeArgs(
            **{**lora_args.model_dump(), "adapter_path": str(second_adapter_dir), "adapters": {}}
        )
    )
    expected_b = alone.chat(MESSAGES, **GREEDY)
    expected_a = lora_engine.chat(MESSAGES, **GREEDY)
    assert expected_a.text != expected_b.text
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        response = lora_client.chat.completions.create(model=name, messages=MESSAGES, **GREEDY)
        assert response.model == name
        answers[name] = response.choices[0].message.content

    # Both adapters at once: they arrive in one batch window and must not be mixed.
    threads = [threading.Thread(target=ask, args=(n,)) for n in ("tiny-lora", "tiny-lora-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {"tiny-lora": expected_a.text, "tiny-lora-b": expected_b.text}
    # In-process, the multi-adapter engine switches per request too.
    request_b = dataclasses.replace(
        lora_engine.prepare_chat(MESSAGES, **GREEDY), adapter="tiny-lora-b"
    )
    assert lora_engine.generate([request_b])[0][0].text == expected_b.text


def test_tool_call_round_trip(urls: dict[str, str]) -> None:
    tools = OpenAI(base_url=urls["tiny-tools"], api_key="none", max_retries=0, timeout=60)
    response = tools.chat.completions.create(
        model="tiny-tools", messages=TOOL_QUESTION, tools=[WEATHER_TOOL], temperature=0.0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # Streamed, the call arrives as one tool_calls delta.
    chunks = list(
        tools.chat.completions.create(
            model="tiny-tools",
            messages=TOOL_QUESTION,
            tools=[WEATHER_TOOL],
            temperature=0.0,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [d.tool_calls[0].function.name for d in deltas] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The tool's result goes back as a `tool` message (the template's observation turn).
    follow_up = [
        *TOOL_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = tools.chat.completions.create(
        model="tiny-tools", messages=follow_up, tools=[WEATHER_TOOL], temperature=0.0, max_tokens=8
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > response.usage.prompt_tokens
    # Without `tools`, the same model answers in plain text: nothing is parsed.
    plain = tools.chat.completions.create(
        model="tiny-tools", messages=TOOL_QUESTION, temperature=0.0, max_tokens=8
    )
    assert plain.choices[0].message.tool_calls is None


def _secure(urls: dict[str, str], key: str) -> OpenAI:
    return OpenAI(base_url=urls["tiny-secure"], api_key=key, max_retries=0, timeout=60)


@pytest.mark.parametrize("key", [FILE_KEY, *ENV_KEYS])
def test_keys_from_file_and_env_are_accepted(urls: dict[str, str], key: str) -> None:
    response = _secure(urls, key).chat.completions.create(
        model="tiny-secure", messages=MESSAGES, temperature=0.0, max_tokens=2
    )
    assert response.usage.completion_tokens <= 2
    assert [m.id for m in _secure(urls, key).models.list().data] == ["tiny-secure"]


def test_missing_or_wrong_key_is_a_401(urls: dict[str, str]) -> None:
    for key in ("sk-wrong", FILE_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            _secure(urls, key).chat.completions.create(model="tiny-secure", messages=MESSAGES)
        assert err.value.code == "invalid_api_key"
        assert "Authorization: Bearer" in err.value.message
        assert FILE_KEY not in err.value.message
    request = urllib.request.Request(urls["tiny-secure"] + "/models")  # no header at all
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=10)
    assert http_err.value.code == 401
    assert json.loads(http_err.value.read())["error"]["code"] == "invalid_api_key"
    # Health stays open for load balancers.
    health = urls["tiny-secure"].removesuffix("/v1") + "/health"
    with urllib.request.urlopen(health, timeout=10) as resp:
        assert resp.status == 200


def test_request_limits(urls: dict[str, str]) -> None:
    client = _secure(urls, FILE_KEY)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-secure", messages=MESSAGES, max_tokens=9)
    assert err.value.param == "max_tokens"
    assert "limit of 8 tokens" in err.value.message
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(
            model="tiny-secure", messages=[{"role": "user", "content": "x" * 3_000}]
        )
    assert too_big.value.status_code == 413
    assert "limit of 2000 bytes" in too_big.value.message


def test_missing_chat_template_is_a_clear_error(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(ServeArgs(model_path=str(tiny_model_dir)))
    with pytest.raises(ChatTemplateMissingError, match="has no chat template"):
        engine.chat(MESSAGES, **GREEDY)
