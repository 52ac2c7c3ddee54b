"""A chat engine on plain transformers: the CPU (and reference) engine behind rayft's server.

It has no Ray in it, so ``rayft chat`` runs it in-process and the Serve replica wraps the very
same object; with greedy decoding both give the same text for the same request.

Example:
    >>> engine = TransformersEngine(ServeArgs(model_path="saves/tiny", stop_words=["<|im_end|>"]))
    >>> engine.chat([{"role": "user", "content": "hi"}], temperature=0.0).text  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

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


class _StopOnText(StoppingCriteria):
    """Stops once the decoded completion contains a stop string.

    transformers' own ``stop_strings`` works on raw token strings and also fires on a stop string
    that begins inside the prompt's last tokens; this one looks only at the completion, decoded
    exactly as the answer is, so stopping and trimming (`trim_at_stop`) always agree.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], *, prompt_len: int, stops: Sequence[str]
    ) -> None:
        self._decode = decode
        self._prompt_len = prompt_len
        self._stops = tuple(stops)

    def __call__(
        self, input_ids: torch.LongTensor, scores: object, **kwargs: object
    ) -> torch.BoolTensor:
        done = [
            first_stop(self._decode(row[self._prompt_len :].tolist()), self._stops) >= 0
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersEngine:
    """Loads a causal LM (+ optional LoRA adapter) and answers chat requests one at a time.

    Generation is serialised by a lock: concurrent requests cannot corrupt each other's state
    (the tokenizer and a seeded RNG are shared), at the price of no batching. Settings the
    OpenAI protocol has no field for (top_k, repetition_penalty …) come from the checkpoint's
    ``generation_config``, as in vLLM.
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
        if args.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter_path)
        self.model = model.to(self.device).eval()
        self.chat_template = args.chat_template or self.tokenizer.chat_template
        self._stop_token_ids = self._collect_stop_token_ids()
        self._lock = threading.Lock()

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for `messages`, ending in the assistant's generation prompt.

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
                tokenize=False,
                add_generation_prompt=True,
                chat_template=self.chat_template,
            )
        except jinja2.TemplateError as exc:
            raise RequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from exc

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt; the template carries bos, so none is added."""
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

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
        stop = [stop] if isinstance(stop, str) else list(stop)
        temperature = self.args.temperature if temperature is None else temperature
        top_p = self.args.top_p if top_p is None else top_p
        stops = list(dict.fromkeys([*stop, *self.args.stop_words]))
        _check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop)
        with self._lock:
            prompt_ids = self.encode_prompt(messages)
            budget = self._budget(len(prompt_ids), max_tokens)
            output = self._generate(
                prompt_ids,
                max_new_tokens=budget,
                temperature=temperature,
                top_p=top_p,
                stops=stops,
                seed=seed,
            )
            completion_ids = tuple(output[len(prompt_ids) :])
            return self._result(len(prompt_ids), completion_ids, budget=budget, stops=stops)

    def _decode(self, ids: list[int]) -> str:
        """The one way completion ids become text, shared by stop strings and the answer."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stops: Sequence[str],
        seed: int | None,
    ) -> list[int]:
        input_ids = torch.tensor([prompt_ids], device=self.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        criteria = StoppingCriteriaList(
            [_StopOnText(self._decode, prompt_len=len(prompt_ids), stops=stops)] if stops else []
        )
        # fork_rng: a request's seed must not reset the process-wide RNG of an in-process caller.
        rng_devices = [] if self.device.type == "cpu" else [torch.cuda.current_device()]
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(self._stop_token_ids) or None,
                pad_token_id=self._pad_token_id(),
                stopping_criteria=criteria,
                **sampling,
            )
        return output[0].tolist()

    def _result(
        self,
        prompt_tokens: int,
        completion_ids: tuple[int, ...],
        *,
        budget: int,
        stops: Sequence[str],
    ) -> ChatResult:
        ended_on_token = bool(completion_ids) and completion_ids[-1] in self._stop_token_ids
        text = self._decode(list(completion_ids[:-1] if ended_on_token else completion_ids))
        text, hit_stop = trim_at_stop(text, stops)
        stopped = ended_on_token or hit_stop or len(completion_ids) < budget
        return ChatResult(
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_ids=completion_ids,
        )

    def _budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """Tokens the completion may use, checked against the context window."""
        context = _context_window(self.model.config)
        room = None if context is None else context - prompt_len
        if room is not None and room < 1:
            raise RequestError(
                f"the prompt is {prompt_len} tokens, which fills the model's context window of "
                f"{context}: shorten the messages",
                param="messages",
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

    def _collect_stop_token_ids(self) -> set[int]:
        """eos ids of the tokenizer and generation config, plus stop words that are one token."""
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update([source] if isinstance(source, int) else source)
        for word in self.args.stop_words:
            word_ids = self.tokenizer.encode(word, add_special_tokens=False)
            if len(word_ids) == 1:
                ids.add(word_ids[0])
        return ids

    def _pad_token_id(self) -> int | None:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return min(self._stop_token_ids) if self._stop_token_ids else None


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


def _context_window(config: object) -> int | None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


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
