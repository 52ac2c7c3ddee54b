"""A chat engine on plain transformers: the CPU (and reference) engine behind rayft's server.

It has no Ray in it, so ``rayft chat`` runs it in-process and the Serve replica wraps the very
same object; with greedy decoding both give the same text for the same request.

Every engine (this one, `serve.vllm_engine.VLLMEngine`) offers the same interface:
``prepare_chat`` / ``prepare_completion`` validate a request and turn it into a
`GenerationRequest` (prompt token ids + sampling), ``generate`` answers a list of them together
(the server's batches), ``stream`` yields one answer's text as it is generated, and ``chat`` /
``complete`` are the one-call conveniences for in-process use.

Example:
    >>> engine = TransformersEngine(ServeArgs(model_path="saves/tiny", stop_words=["<|im_end|>"]))
    >>> engine.chat([{"role": "user", "content": "hi"}], temperature=0.0).text  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from serve.args import ServeArgs
from serve.text import first_stop, trim_at_stop

FinishReason = Literal["stop", "length"]


class RequestError(ValueError):
    """A request the engine cannot answer as asked (the caller's fault: HTTP 400).

    Attributes:
        param: the request field at fault, if one is.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatTemplateMissingError(RuntimeError):
    """Neither ServeArgs.chat_template nor the tokenizer provides a chat template."""


@dataclass(frozen=True)
class ChatResult:
    """One completion.

    Attributes:
        text: the answer, decoded without special tokens and cut before the first stop string.
        finish_reason: ``stop`` (eos, a stop token or a stop string) or ``length`` (budget used).
        prompt_tokens: length of the rendered, tokenized prompt.
        completion_ids: every token the model generated, a final stop token included.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_ids: tuple[int, ...]

    @property
    def completion_tokens(self) -> int:
        """Tokens generated (what the OpenAI ``usage`` reports)."""
        return len(self.completion_ids)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for any engine: prompt token ids and sampling settings.

    Attributes:
        prompt_ids: the rendered, tokenized prompt.
        max_new_tokens: the completion budget, already checked against the context window.
        temperature: 0 decodes greedily.
        top_p: nucleus mass when sampling.
        stops: stop strings (the request's and the template's), the answer ends before them.
        seed: seeds sampling; a seeded request is always decoded on its own, so it reproduces.
        n: completions wanted for this prompt.
        skip_special_tokens: decode the answer without special tokens; off for requests
            offered tools, whose call tags (``<tool_call>``) may be special tokens.
        adapter: a name of `ServeArgs.adapters` to answer with; None: the served model itself
            (base weights plus `ServeArgs.adapter_path`, if given).
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    adapter: str | None = None


@dataclass
class StreamDelta:
    """One step of a streamed answer: new text, and on the last step the whole result."""

    text: str
    result: ChatResult | None = None


class _RowStops(StoppingCriteria):
    """Per-row budgets and stop strings for a batch, plus cancellation of a streamed answer.

    transformers' own ``stop_strings`` works on raw token strings and also fires on a stop string
    that begins inside the prompt's last tokens; this one looks only at the completion, decoded
    exactly as the answer is, so stopping and trimming (`trim_at_stop`) always agree. It records
    the length at which each row finished: later tokens of that row are padding.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        prompt_len: int,
        budgets: Sequence[int],
        stops: Sequence[Sequence[str]],
        cancel: threading.Event | None = None,
    ) -> None:
        self._decode = decode
        self._prompt_len = prompt_len
        self._budgets = list(budgets)
        self._stops = [tuple(s) for s in stops]
        self._cancel = cancel
        self.ends: dict[int, int] = {}

    def __call__(
        self, input_ids: torch.LongTensor, scores: object, **kwargs: object
    ) -> torch.BoolTensor:
        cancelled = self._cancel is not None and self._cancel.is_set()
        generated = input_ids.shape[1] - self._prompt_len
        done = []
        for row, ids in enumerate(input_ids):
            if row not in self.ends and (
                cancelled
                or generated >= self._budgets[row]
                or (
                    self._stops[row]
                    and first_stop(self._decode(ids[self._prompt_len :].tolist()), self._stops[row])
                    >= 0
                )
            ):
                self.ends[row] = generated
            done.append(row in self.ends)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Hands generated token ids to the streaming consumer; the first `put` is the prompt."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(None)


@dataclass
class _Row:
    request: int
    prompt_ids: tuple[int, ...]
    budget: int
    stops: tuple[str, ...]
    results: list[ChatResult] = field(default_factory=list)


class TransformersEngine:
    """Loads a causal LM (+ optional LoRA adapter) and answers requests, batched or streamed.

    Requests given to `generate` together are decoded as one left-padded batch where that keeps
    every answer what it would be alone: greedy requests together, unseeded sampled requests with
    the same temperature and top_p together, each seeded request on its own (so its seed
    reproduces). Generation is serialised by a lock: the model, tokenizer and RNG are shared.
    Settings the OpenAI protocol has no field for (top_k, repetition_penalty …) come from the
    checkpoint's ``generation_config``, as in vLLM.
    """

    def __init__(self, args: ServeArgs) -> None:
        """Load tokenizer and model.

        Args:
            args: what to load and the default sampling settings.

        Raises:
            OSError: a path does not hold a model, tokenizer or adapter.
        """
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            _tokenizer_source(args), trust_remote_code=args.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            args.model_path,
            dtype=_torch_dtype(args.dtype, self.device),
            trust_remote_code=args.trust_remote_code,
        )
        # `adapter_path` is the adapter called "default" (peft's name); `adapters` are loaded
        # next to it on the same base weights and picked per request (GenerationRequest.adapter).
        for name, path in [("default", args.adapter_path), *args.adapters.items()]:
            if not path:
                continue
            from peft import PeftModel

            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
        self.model = model.to(self.device).eval()
        self.prompts = PromptBuilder(
            args, self.tokenizer, context_window=_context_window(self.model.config, args)
        )
        self._stop_token_ids = stop_token_ids(
            self.tokenizer, args.stop_words, self.model.generation_config.eos_token_id
        )
        self._lock = threading.Lock()

    # -- preparing requests ----------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for `messages` (see `PromptBuilder.render`)."""
        return self.prompts.render(messages)

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt; the template carries bos, so none is added."""
        return self.prompts.encode_chat(messages)

    def prepare_chat(
        self, messages: Sequence[dict[str, str]], **sampling: object
    ) -> GenerationRequest:
        """Validate a chat request (see `PromptBuilder.prepare_chat`)."""
        return self.prompts.prepare_chat(messages, **sampling)

    def prepare_completion(self, prompt: str, **sampling: object) -> GenerationRequest:
        """Validate a raw-text completion request (see `PromptBuilder.prepare_completion`)."""
        return self.prompts.prepare_completion(prompt, **sampling)

    # -- one-call conveniences -------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> ChatResult:
        """Answer one conversation.

        Args:
            messages: ``{"role", "content"}`` turns, oldest first.
            max_tokens: completion budget; default ServeArgs.max_new_tokens, shrunk to what the
                context window leaves.
            temperature: 0 decodes greedily; default ServeArgs.temperature.
            top_p: nucleus mass for sampling; default ServeArgs.top_p.
            stop: strings that end the answer (the answer is cut before the first one).
            seed: makes sampling reproducible; without it sampling draws fresh randomness.

        Returns:
            The answer with its finish reason and token counts.

        Raises:
            RequestError: a sampling value is out of range, a stop string is empty, or the
                prompt plus ``max_tokens`` does not fit the model's context window.
            ChatTemplateMissingError: no chat template is configured or shipped.
        """
        request = self.prepare_chat(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )
        return self.generate([request])[0][0]

    def complete(self, prompt: str, **sampling: object) -> ChatResult:
        """Continue `prompt` as raw text (no chat template); sampling as in `chat`."""
        return self.generate([self.prepare_completion(prompt, **sampling)])[0][0]

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[ChatResult]]:
        """Answer several requests, batching those whose answers batching cannot change.

        Args:
            requests: prepared requests.

        Returns:
            For each request, its ``n`` results in order.
        """
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            skip = request.skip_special_tokens
            if request.temperature == 0:
                key: tuple = ("greedy", skip, request.adapter)
            elif request.seed is None:
                key = ("sampled", request.temperature, request.top_p, skip, request.adapter)
            else:
                key = ("seeded", i)
            groups.setdefault(key, []).append(i)
        results: list[list[ChatResult]] = [[] for _ in requests]
        with self._lock:
            for indices in groups.values():
                for i, answers in zip(
                    indices, self._generate_group([requests[i] for i in indices]), strict=True
                ):
                    results[i] = answers
        return results

    def stream(
        self, request: GenerationRequest, *, cancel: threading.Event | None = None
    ) -> Iterator[StreamDelta]:
        """Generate one answer (``n`` must be 1), yielding its text as it grows.

        Text is held back while it could still be the start of a stop string, so no delta ever
        contains text past a stop: the deltas join to exactly the non-streamed answer. The last
        delta carries the `ChatResult`. Closing the iterator early, or setting `cancel` (safe
        from any thread), stops generation.

        Raises:
            RequestError: ``n`` is not 1.
        """
        if request.n != 1:
            raise RequestError("streaming supports n=1 only", param="n")
        tokens = _TokenQueue()
        cancel = cancel or threading.Event()
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                with self._lock:
                    outcome["result"] = self._generate_group(
                        [request], streamer=tokens, cancel=cancel
                    )[0][0]
            except BaseException as exc:  # handed to the consumer, which re-raises it
                outcome["error"] = exc
                tokens.end()

        worker = threading.Thread(target=run, name="rayft-stream", daemon=True)
        worker.start()
        hold = max((len(s) for s in request.stops), default=1) - 1
        ids: list[int] = []
        emitted = ""
        try:
            while (token := tokens.tokens.get()) is not None:
                ids.append(token)
                text = self._decode(
                    [t for t in ids if t not in self._stop_token_ids],
                    skip_special=request.skip_special_tokens,
                )
                cut = first_stop(text, request.stops)
                safe = text[:cut] if cut >= 0 else text[: len(text) - hold]
                safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the rest
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    yield StreamDelta(text=safe[len(emitted) :])
                    emitted = safe
            worker.join()
            if "error" in outcome:
                raise outcome["error"]  # type: ignore[misc]
            result: ChatResult = outcome["result"]  # type: ignore[assignment]
            assert result.text.startswith(emitted), (result.text, emitted)
            yield StreamDelta(text=result.text[len(emitted) :], result=result)
        finally:
            cancel.set()

    def _decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        """The one way completion ids become text, shared by stop strings and the answer."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _generate_group(
        self,
        requests: Sequence[GenerationRequest],
        *,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[ChatResult]]:
        """Decode requests sharing sampling settings as one left-padded batch (lock held)."""
        sampled = requests[0].temperature > 0
        rows = [
            _Row(i, r.prompt_ids, r.max_new_tokens, r.stops)
            for i, r in enumerate(requests)
            # Greedy copies would be identical: decode once, copy the result.
            for _ in range(r.n if sampled else 1)
        ]
        width = max(len(row.prompt_ids) for row in rows)
        pad = self._pad_token_id()
        pad = 0 if pad is None else pad
        input_ids = torch.tensor(
            [[pad] * (width - len(row.prompt_ids)) + list(row.prompt_ids) for row in rows],
            device=self.device,
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows],
            device=self.device,
        )
        first = requests[0]
        sampling = (
            {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
            if sampled
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        skip = first.skip_special_tokens
        stops = _RowStops(
            lambda ids: self._decode(ids, skip_special=skip),
            prompt_len=width,
            budgets=[row.budget for row in rows],
            stops=[row.stops for row in rows],
            cancel=cancel,
        )
        # fork_rng: a request's seed must not reset the process-wide RNG of an in-process caller.
        rng_devices = [] if self.device.type == "cpu" else [torch.cuda.current_device()]
        with (
            torch.random.fork_rng(devices=rng_devices),
            torch.inference_mode(),
            self._adapter(first.adapter),
        ):
            if first.seed is not None:
                torch.manual_seed(first.seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(row.budget for row in rows),
                eos_token_id=sorted(self._stop_token_ids) or None,
                pad_token_id=self._pad_token_id(),
                stopping_criteria=StoppingCriteriaList([stops]),
                streamer=streamer,
                **sampling,
            )
        results: list[list[ChatResult]] = [[] for _ in requests]
        for index, row in enumerate(rows):
            generated = output[index, width:].tolist()
            end = min(stops.ends.get(index, len(generated)), row.budget, len(generated))
            for pos, token in enumerate(generated[:end]):
                if token in self._stop_token_ids:
                    end = pos + 1
                    break
            results[row.request].append(
                self._result(
                    len(row.prompt_ids),
                    tuple(generated[:end]),
                    budget=row.budget,
                    stops=row.stops,
                    skip_special=skip,
                )
            )
        if not sampled:
            results = [answers * r.n for answers, r in zip(results, requests, strict=True)]
        return results

    def _result(
        self,
        prompt_tokens: int,
        completion_ids: tuple[int, ...],
        *,
        budget: int,
        stops: Sequence[str],
        skip_special: bool,
    ) -> ChatResult:
        ended_on_token = bool(completion_ids) and completion_ids[-1] in self._stop_token_ids
        text = self._decode(
            list(completion_ids[:-1] if ended_on_token else completion_ids),
            skip_special=skip_special,
        )
        text, hit_stop = trim_at_stop(text, stops)
        stopped = ended_on_token or hit_stop or len(completion_ids) < budget
        return ChatResult(
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_ids=completion_ids,
        )

    def _adapter(self, name: str | None) -> contextlib.AbstractContextManager:
        """Make adapter `name` (None: the served model's own) the active one (lock held)."""
        if not (self.args.adapter_path or self.args.adapters):
            return contextlib.nullcontext()
        if name is None and not self.args.adapter_path:
            return self.model.disable_adapter()  # the base weights alone
        self.model.set_adapter(name or "default")
        return contextlib.nullcontext()

    def _pad_token_id(self) -> int | None:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return min(self._stop_token_ids) if self._stop_token_ids else None


class PromptBuilder:
    """Turns chat messages or raw text into a validated `GenerationRequest`; shared by engines.

    Args:
        args: the served model's defaults (sampling, stop words, chat template).
        tokenizer: the model's tokenizer.
        context_window: the model's maximum sequence length, if known.
    """

    def __init__(self, args: ServeArgs, tokenizer: object, *, context_window: int | None) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.chat_template = args.chat_template or getattr(tokenizer, "chat_template", None)

    def render(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None
    ) -> str:
        """The prompt text for `messages`, ending in the assistant's generation prompt.

        `tools` (OpenAI tool definitions) go to the template, which writes them into the
        system prompt in its tool format; assistant turns may carry ``tool_calls`` and
        ``tool`` turns tool results (see `data_pipelines.templates.Template.to_jinja`).

        Raises:
            ChatTemplateMissingError: no chat template is configured or shipped.
            RequestError: the template rejects the conversation (e.g. roles must alternate).
        """
        if not self.chat_template:
            raise ChatTemplateMissingError(
                f"model {self.args.model_path!r} has no chat template: set ServeArgs.chat_template "
                "to the Jinja template the model was trained with"
            )
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=True,
                chat_template=self.chat_template,
            )
        except jinja2.TemplateError as exc:
            raise RequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from exc

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None
    ) -> list[int]:
        """Token ids of the rendered prompt; the template carries bos, so none is added."""
        return self.tokenizer(self.render(messages, tools), add_special_tokens=False)["input_ids"]

    def prepare_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        n: int = 1,
    ) -> GenerationRequest:
        """Render, tokenize and validate a chat request.

        With `tools`, the answer keeps special tokens, so tool-call tags survive decoding.

        Raises:
            RequestError: a sampling value is out of range, a stop string is empty, or the
                prompt plus ``max_tokens`` does not fit the model's context window.
            ChatTemplateMissingError: no chat template is configured or shipped.
        """
        request = self._request(
            self.encode_chat(messages, tools),
            "messages",
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            n=n,
        )
        return replace(request, skip_special_tokens=False) if tools else request

    def prepare_completion(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        n: int = 1,
    ) -> GenerationRequest:
        """Tokenize raw text (the tokenizer's own bos added, no chat template) and validate.

        Raises:
            RequestError: as for `prepare_chat`, or the prompt is empty.
        """
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._request(
            ids,
            "prompt",
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            n=n,
        )

    def _request(
        self,
        prompt_ids: list[int],
        prompt_field: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: Sequence[str],
        seed: int | None,
        n: int,
    ) -> GenerationRequest:
        stop = [stop] if isinstance(stop, str) else list(stop)
        temperature = self.args.temperature if temperature is None else temperature
        top_p = self.args.top_p if top_p is None else top_p
        _check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop)
        if n < 1:
            raise RequestError(f"n must be >= 1, got {n}", param="n")
        return GenerationRequest(
            prompt_ids=tuple(prompt_ids),
            max_new_tokens=self._budget(len(prompt_ids), max_tokens, prompt_field),
            temperature=temperature,
            top_p=top_p,
            stops=tuple(dict.fromkeys([*stop, *self.args.stop_words])),
            seed=seed,
            n=n,
        )

    def _budget(self, prompt_len: int, max_tokens: int | None, prompt_field: str) -> int:
        """Tokens the completion may use, checked against the context window."""
        context = self.context_window
        room = None if context is None else context - prompt_len
        if room is not None and room < 1:
            raise RequestError(
                f"the prompt is {prompt_len} tokens, which fills the model's context window of "
                f"{context}: shorten the {prompt_field}",
                param=prompt_field,
            )
        if max_tokens is None:
            return self.args.max_new_tokens if room is None else min(self.args.max_new_tokens, room)
        if room is not None and max_tokens > room:
            raise RequestError(
                f"max_tokens={max_tokens} does not fit: the prompt is {prompt_len} tokens and the "
                f"context window {context}, so at most {room} tokens can be generated",
                param="max_tokens",
            )
        return max_tokens


def stop_token_ids(
    tokenizer: object, stop_words: Sequence[str], generation_eos: int | list[int] | None
) -> set[int]:
    """eos ids of the tokenizer and generation config, plus stop words that are one token."""
    ids: set[int] = set()
    for source in (generation_eos, getattr(tokenizer, "eos_token_id", None)):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    for word in stop_words:
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        if len(word_ids) == 1:
            ids.add(word_ids[0])
    return ids


def _check_sampling(
    *, max_tokens: int | None, temperature: float, top_p: float, stop: Sequence[str]
) -> None:
    """Validate sampling values for in-process callers (the HTTP protocol checks them too)."""
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if any(not s for s in stop):
        raise RequestError("stop strings must not be empty", param="stop")


def _context_window(config: object, args: ServeArgs) -> int | None:
    """The model's context window, or ServeArgs.max_model_len when that is set (and smaller)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    native = getattr(text_config, "max_position_embeddings", None)
    if args.max_model_len is None:
        return native
    return args.max_model_len if native is None else min(native, args.max_model_len)


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    if dtype == "auto":
        # bf16 matmuls are emulated on CPU: float32 is far faster there.
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, dtype)


def _tokenizer_source(args: ServeArgs) -> str:
    """An adapter directory that ships its own tokenizer (training may add tokens) wins."""
    if args.adapter_path and os.path.isfile(
        os.path.join(args.adapter_path, "tokenizer_config.json")
    ):
        return args.adapter_path
    return args.model_path
