"""The server under load, under backpressure, losing a replica, and autoscaling — all on loopback.

Three applications of the tiny model on one private Ray cluster (the session's `ray_cluster`):
``/load`` (one replica, batching), ``/tight`` (one request at a time, a queue of two: the rest
get 429) and ``/auto`` (autoscaling 1 → 2 with second-scale delays). Every check is bounded in
time; nothing here measures speed (see benchmarks/serve_throughput.py for figures).

Run: ``python -m pytest tests/integration/test_serve_load.py -x -q``
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from serve import ServeArgs, run_server
from tests.fixtures.servers import free_loopback_port

pytestmark = pytest.mark.ray

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["Hi", "Who are you?", "2+2", "Name three colours.", "Tell me a story."]


@pytest.fixture(scope="module")
def apps(ray_cluster: float, tiny_model_dir: Path) -> Iterator[dict[str, str]]:
    """Base URLs of the three applications; Serve is shut down after the module."""
    from ray import serve

    common = {
        "model_path": str(tiny_model_dir),
        "chat_template": CHATML,
        "stop_words": ["<|im_end|>"],
        "max_new_tokens": 12,
        "port": free_loopback_port(),
        "num_cpus_per_replica": 0.5,
    }
    urls = {
        "load": run_server(
            ServeArgs(**common, model_name="load", route_prefix="/load", max_ongoing_requests=16),
            blocking=False,
        ),
        "tight": run_server(
            ServeArgs(
                **common,
                model_name="tight",
                route_prefix="/tight",
                max_ongoing_requests=1,
                max_batch_size=1,
                max_queued_requests=2,
            ),
            blocking=False,
        ),
        "auto": run_server(
            ServeArgs(
                **common,
                model_name="auto",
                route_prefix="/auto",
                max_ongoing_requests=4,
                autoscaling={
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 3,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            ),
            blocking=False,
        ),
    }
    try:
        yield urls
    finally:
        serve.shutdown()


def _wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    """Poll `condition` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")


def test_200_requests_at_concurrency_16_all_complete(apps: dict[str, str]) -> None:
    client = AsyncOpenAI(base_url=apps["load"], api_key="none", max_retries=0, timeout=120)
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[str, str | None]:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        async with limit:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="load", messages=messages, max_tokens=12, stream=True
                )
                text, finish = "", None
                async for chunk in stream:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                return text, finish
            response = await client.chat.completions.create(
                model="load", messages=messages, max_tokens=12
            )
            return response.choices[0].message.content, response.choices[0].finish_reason

    async def all_of() -> list:
        try:
            return await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(all_of())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(isinstance(text, str) and finish in ("stop", "length") for text, finish in results)
    assert time.monotonic() - start < 120


def test_over_the_queue_limit_clients_get_429_never_a_crash(apps: dict[str, str]) -> None:
    client = OpenAI(base_url=apps["tight"], api_key="none", max_retries=0, timeout=120)
    outcomes: list[object] = []
    refusals: list[tuple[object, str | None]] = []
    barrier = threading.Barrier(12)

    def ask() -> None:
        barrier.wait()
        try:
            stream = client.chat.completions.create(
                model="tight", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            outcomes.append([c.choices[0].finish_reason for c in stream][-1])
        except openai.APIStatusError as exc:
            outcomes.append(exc.status_code)
            refusals.append((exc.body, exc.response.headers.get("retry-after")))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 12
    assert 429 in outcomes  # the queue (2) and the replica (1) cannot hold 12
    assert {o for o in outcomes if isinstance(o, int)} == {429}  # no 5xx
    assert any(o in ("stop", "length") for o in outcomes)
    # Refused by the app, not Serve's proxy: an OpenAI error body the client parsed.
    for body, retry_after in refusals:
        assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded", body
        assert "max_queued_requests" in body["message"] and retry_after == "1"
    # The official client backs off on 429 (Retry-After) and then gets its answer.
    patient = OpenAI(base_url=apps["tight"], api_key="none", max_retries=5, timeout=120)
    answer = patient.chat.completions.create(
        model="tight", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def _replica_actor_names(app: str) -> set[str]:
    import ray

    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#")
    }


def _answers(base_url: str, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_a_killed_replica_is_replaced_and_the_endpoint_answers_again(
    apps: dict[str, str],
) -> None:
    import ray

    assert _answers(apps["load"], "load")
    (victim,) = _replica_actor_names("load")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    took = _wait_for(
        lambda: _replica_actor_names("load") - {victim} and _answers(apps["load"], "load"),
        timeout_s=80,
        what="a replacement replica answering",
    )
    assert victim not in _replica_actor_names("load")
    print(f"replica replaced and answering after {took:.1f}s")


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["ChatServer"]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.slow  # about a minute of load and idle time
def test_autoscaling_goes_to_two_replicas_under_load_and_back_after_idle(
    apps: dict[str, str],
) -> None:
    assert _running_replicas("auto") == 1
    stop = threading.Event()
    client = OpenAI(base_url=apps["auto"], api_key="none", max_retries=3, timeout=120)

    def keep_busy() -> None:
        # Streams are generated one at a time per replica: four of them keep it saturated.
        while not stop.is_set():
            stream = client.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "Tell me a story."}],
                max_tokens=64,
                stream=True,
            )
            for _ in stream:
                pass

    workers = [threading.Thread(target=keep_busy, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        up = _wait_for(lambda: _running_replicas("auto") == 2, timeout_s=75, what="scale-up to 2")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    down = _wait_for(lambda: _running_replicas("auto") == 1, timeout_s=75, what="scale-down to 1")
    print(f"scaled up after {up:.1f}s of load, down after {down:.1f}s idle")
    assert _answers(apps["auto"], "auto")
