"""Engine selection, deployment options and batched decoding, without a Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.args import ServeArgs
from serve.engines import EngineUnavailableError, load_engine, select_engine, vllm_installed

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("requested", "cuda", "vllm", "chosen"),
    [
        ("auto", True, True, "vllm"),
        ("auto", True, False, "transformers"),
        ("auto", False, True, "transformers"),
        ("auto", False, False, "transformers"),
        ("transformers", True, True, "transformers"),
        ("vllm", True, True, "vllm"),
        ("vllm", False, True, "vllm"),  # explicit: vLLM's CPU build
    ],
)
def test_select_engine(requested: str, cuda: bool, vllm: bool, chosen: str) -> None:
    assert select_engine(requested, cuda_available=cuda, vllm_installed=vllm) == chosen


def test_vllm_without_vllm_names_the_install_command() -> None:
    with pytest.raises(EngineUnavailableError) as err:
        select_engine("vllm", cuda_available=True, vllm_installed=False)
    assert "pip install 'rayft[vllm]'" in str(err.value)
    assert "rayft[vllm-cpu]" in str(err.value)
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        select_engine("tgi", cuda_available=False, vllm_installed=False)


@pytest.mark.skipif(vllm_installed(), reason="checks the error when vLLM is absent")
def test_load_engine_vllm_fails_before_loading_anything() -> None:
    with pytest.raises(EngineUnavailableError, match="rayft\\[vllm\\]"):
        load_engine(ServeArgs(model_path="/nonexistent", engine="vllm"))


def _options(**fields: object) -> tuple[object, object, dict]:
    from serve.app import build_app

    deployment = build_app({"model_path": "m", **fields})._bound_deployment
    config = deployment._deployment_config
    return deployment.num_replicas, config.autoscaling_config, deployment.ray_actor_options


def test_build_app_passes_replicas_and_resources() -> None:
    replicas, autoscaling, actor = _options(num_replicas=3, num_cpus_per_replica=0.5)
    assert (replicas, autoscaling, actor["num_cpus"]) == (3, None, 0.5)
    assert _options()[0] == 1


def test_build_app_passes_autoscaling() -> None:
    from serve.app import build_app

    _, autoscaling, _ = _options(
        autoscaling={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3}
    )
    assert (
        autoscaling.min_replicas,
        autoscaling.max_replicas,
        autoscaling.target_ongoing_requests,
    ) == (0, 4, 3.0)
    deployment = build_app({"model_path": "m", "max_batch_size": 40})._bound_deployment
    assert deployment.max_ongoing_requests == 40  # batches must be able to fill


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):  # noqa: ANN201
    from serve.engine import TransformersEngine

    return TransformersEngine(
        ServeArgs(
            model_path=str(tiny_model_dir),
            chat_template=CHATML,
            stop_words=["<|im_end|>"],
            max_new_tokens=16,
        )
    )


def test_batched_greedy_equals_one_by_one(engine) -> None:  # noqa: ANN001
    prompts = ["Hi", "Who are you? Tell me about yourself.", "2+2", "Name three colours."]
    requests = [
        engine.prepare_chat([{"role": "user", "content": p}], temperature=0.0, max_tokens=m)
        for p, m in zip(prompts, (12, 9, 4, 12), strict=True)
    ]
    alone = [engine.generate([r])[0] for r in requests]
    assert engine.generate(requests) == alone
    assert [len(r[0].completion_ids) for r in alone][2] <= 4


def test_stream_joins_to_the_answer_and_holds_back_stops(engine) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Hi"}]
    full = engine.chat(messages, temperature=0.0, max_tokens=16)
    request = engine.prepare_chat(messages, temperature=0.0, max_tokens=16)
    steps = list(engine.stream(request))
    assert "".join(s.text for s in steps) == full.text
    assert steps[-1].result == full
    stop = full.text[4:7]
    stopped = engine.prepare_chat(messages, temperature=0.0, max_tokens=16, stop=[stop])
    pieces = [s.text for s in engine.stream(stopped)]
    assert "".join(pieces) == full.text[: full.text.find(stop)]


def test_n_samples_and_seeds(engine) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Hi"}]
    sampled = engine.prepare_chat(messages, temperature=1.0, max_tokens=8, seed=5, n=3)
    first = engine.generate([sampled])[0]
    assert first == engine.generate([sampled])[0]
    assert len({r.completion_ids for r in first}) > 1
    greedy = engine.prepare_chat(messages, temperature=0.0, max_tokens=8, n=2)
    assert len({r.text for r in engine.generate([greedy])[0]}) == 1


def test_completion_uses_no_chat_template(engine) -> None:  # noqa: ANN001
    result = engine.complete("Once upon a time", temperature=0.0, max_tokens=5)
    ids = engine.tokenizer("Once upon a time")["input_ids"]
    assert result.prompt_tokens == len(ids)
    assert len(result.completion_ids) <= 5


def test_build_app_passes_queue_resources_and_autoscaling_delays() -> None:
    from serve.app import build_app

    deployment = build_app(
        {
            "model_path": "m",
            "max_queued_requests": 4,
            "resources_per_replica": {"GPU": 1, "accelerator_type:L4": 0.1},
            "autoscaling": {"max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 5},
        }
    )._bound_deployment
    config = deployment._deployment_config
    # The app answers 429 itself; Serve's queue stays unbounded (its router briefly queues a
    # burst, and a bound there answered with a plain-text 429 before the replica was full).
    assert config.max_queued_requests == -1
    # The replica holds 32 (max_ongoing_requests) + 4 queued itself; Serve routes past that so
    # the excess reaches the app's JSON 429 instead of the proxy's plain-text one.
    assert config.max_ongoing_requests == 36 + 64
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment.ray_actor_options["resources"] == {"accelerator_type:L4": 0.1}
    autoscaling = config.autoscaling_config
    assert (autoscaling.upscale_delay_s, autoscaling.downscale_delay_s) == (1.0, 5.0)
    with pytest.raises(ValueError, match="num_cpus_per_replica"):
        ServeArgs(model_path="m", resources_per_replica={"CPU": 2})
    with pytest.raises(ValueError, match="also model_name"):
        ServeArgs(model_path="m", model_name="a", adapters={"a": "/x"})


def test_admission_refuses_past_capacity_and_frees_each_place_once() -> None:
    from serve.admission import Admission, serve_limit

    gate = Admission(capacity=2, active_limit=1)
    first, second = gate.enter(), gate.enter()
    assert first is not None and second is not None
    assert gate.enter() is None
    first.release()
    first.release()  # idempotent: a stream's end and a failed hand-off may both release
    assert gate.held == 1
    assert gate.enter() is not None and gate.enter() is None
    unbounded = Admission(capacity=None, active_limit=1)
    assert all(unbounded.enter() is not None for _ in range(100))
    assert (serve_limit(3), serve_limit(100)) == (67, 200)


def test_only_the_vllm_engine_takes_requests_one_by_one_for_continuous_batching() -> None:
    from serve.engine import TransformersEngine
    from serve.engines import ContinuousBatching
    from serve.vllm_engine import VLLMEngine

    # The replica hands a ContinuousBatching engine each request at once; Serve's batching
    # (one static batch at a time) would make vLLM wait for a whole batch to finish.
    assert issubclass(VLLMEngine, ContinuousBatching)
    assert not issubclass(TransformersEngine, ContinuousBatching)


def test_vllm_gets_float32_for_auto_on_a_cpu_without_bf16_instructions() -> None:
    from serve.vllm_engine import vllm_dtype

    avx2 = frozenset({"sse4_2", "avx2", "fma"})
    assert vllm_dtype("auto", cuda=False, cpu_flags=avx2) == "float32"
    assert vllm_dtype("auto", cuda=False, cpu_flags=avx2 | {"amx_bf16"}) == "auto"
    assert vllm_dtype("auto", cuda=True, cpu_flags=avx2) == "auto"
    assert vllm_dtype("bfloat16", cuda=False, cpu_flags=avx2) == "bfloat16"


def test_a_stream_the_client_left_before_its_first_event_frees_its_place() -> None:
    import asyncio

    from starlette.requests import ClientDisconnect

    from serve.admission import Admission
    from serve.app import _event_stream

    async def scenario() -> tuple[int, bool]:
        gate = Admission(capacity=1, active_limit=1)
        ticket = gate.enter()
        assert ticket is not None
        started = False

        async def events():  # never reached: the client is gone before the headers go out
            nonlocal started
            started = True
            yield "data: {}\n\n"

        async def gone(message: dict) -> None:
            raise OSError("client disconnected")

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises((ClientDisconnect, OSError)):  # starlette wraps the OSError
            await _event_stream(events(), ticket)(scope, receive, gone)
        return gate.held, started

    held, started = asyncio.run(scenario())
    assert (held, started) == (0, False)


def test_max_model_len_shrinks_the_context_window(tiny_model_dir: Path) -> None:
    from serve.engine import RequestError, TransformersEngine

    engine = TransformersEngine(
        ServeArgs(model_path=str(tiny_model_dir), chat_template=CHATML, max_model_len=64)
    )
    assert engine.prompts.context_window == 64
    with pytest.raises(RequestError, match="context window of 64"):
        engine.prepare_chat([{"role": "user", "content": "hello world " * 40}])
