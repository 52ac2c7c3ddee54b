"""The OpenAI-compatible HTTP server: FastAPI inside a Ray Serve deployment.

Routes (relative to ``ServeArgs.route_prefix``): ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both also streamed as server-sent
events with ``stream: true``), ``GET /health``. Every error is an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``) with a status the official clients map
to their exception classes: 400 bad request, 401 missing or wrong API key, 404 unknown model or
route, 405 wrong method, 413 body too large, 415 not JSON, 429 (with ``Retry-After``) when a
replica already holds ``max_ongoing_requests + max_queued_requests`` requests
(`serve.admission`), 500 engine failure.

Each application serves ``model_name`` and, on the same weights, every adapter of
``ServeArgs.adapters`` under its own name. With ``tools``, the answer is parsed for tool calls in
the template's tool format (`serve.tools`).

On the transformers engine, non-streamed requests that arrive together are decoded together
(`serve.batch`) and streamed ones one at a time as they come. A continuous-batching engine
(vLLM, `serve.engines.ContinuousBatching`) gets every request, streamed or not, as it arrives
and batches them itself.

Two ways in:
    - a KubeRay RayService: ``import_path: serve.app:build_app`` with the `ServeArgs` fields
      as the application's ``args``;
    - locally, on a Ray cluster the caller started::

        ray.init(...)
        url = run_server(ServeArgs(model_path="saves/tiny", port=8000), blocking=True)
"""

# No `from __future__ import annotations` here: Ray Serve rebuilds the route signatures with
# inspect.signature (without evaluating strings), so FastAPI would see `request: "Request"` as a
# query parameter.
import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serve.admission import Admission, Ticket, serve_limit
from serve.args import ServeArgs
from serve.auth import bearer_ok, load_api_keys
from serve.engine import (
    ChatResult,
    ChatTemplateMissingError,
    GenerationRequest,
    RequestError,
    StreamDelta,
)
from serve.engines import ContinuousBatching, load_engine
from serve.protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    FunctionCallOut,
    ModelCard,
    ModelList,
    ProtocolError,
    ToolCallOut,
    Usage,
    parse_chat_request,
    parse_completion_request,
    sse,
)
from serve.tools import parse_tool_calls

logger = logging.getLogger(__name__)

# Hosts that mean "this machine": the returned URL and the readiness probe use loopback.
_LOCAL_HOSTS = {"0.0.0.0", "::", "localhost", "127.0.0.1"}
_READY_TIMEOUT_S = 60.0
# Seconds a client refused with 429 is asked to wait (the official clients honour it).
RETRY_AFTER_S = 1

api = FastAPI(title="rayft", summary="OpenAI-compatible completions for rayft models")


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI error body with its HTTP status.

    Args:
        status: HTTP status (400, 401, 404, 413, 500 …).
        message: what went wrong and, for the caller's errors, how to fix it.
        param: the request field at fault.
        code: a machine-readable code (``model_not_found`` …).
        kind: the error ``type`` (default: ``invalid_request_error`` below 500, else
            ``server_error``).
        headers: extra response headers (``Retry-After`` …).

    Returns:
        The JSON response.
    """
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the OpenAI shape too.
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


class _Reject(Exception):
    """Ends request handling early with an OpenAI error response."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def _usage(results: list[ChatResult]) -> Usage:
    """The prompt counted once, the completions of every choice summed (as OpenAI does)."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def active_requests(args: ServeArgs) -> int:
    """Requests a replica generates for at once: ``max_ongoing_requests``, but at least
    ``max_batch_size``, or batches could never fill."""
    return max(args.max_ongoing_requests, args.max_batch_size)


def replica_capacity(args: ServeArgs) -> int | None:
    """Requests one replica holds (generating + queued) before it answers 429; None: no bound."""
    if args.max_queued_requests is None:
        return None
    return active_requests(args) + args.max_queued_requests


# Defined before the deployment class: module names bound after it were missing in the replica
# (a NameError under Ray Serve), so every helper the class uses comes first.
class _StreamFailed(Exception):
    """A stream broke after its first event; carries the error event to send."""

    def __init__(self, event: str) -> None:
        super().__init__("stream failed")
        self.event = event


class _AdmittedStream(StreamingResponse):
    """A streamed response that frees its request's admission ticket however it ends.

    The body's own ``finally`` does not run when the body never starts (the client left before
    the first event was sent): freeing the ticket when the response is done being sent covers
    that case, so an abandoned stream cannot keep its place in the replica for good.
    """

    def __init__(self, content: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def _event_stream(events: AsyncIterator[str], ticket: Ticket) -> StreamingResponse:
    """The events as server-sent events; the request's admission ticket is freed at the end."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except _StreamFailed as failed:
            yield failed.event
            yield SSE_DONE
        finally:
            ticket.release()

    return _AdmittedStream(body(), ticket)


@serve.deployment
@serve.ingress(api)
class ChatServer:
    """One replica: an engine (`serve.engines.load_engine`) behind the OpenAI routes."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.api_keys = load_api_keys(args)
        self.engine = load_engine(args)
        self.admission = Admission(
            capacity=replica_capacity(args), active_limit=active_requests(args)
        )
        self._generate_batch.set_max_batch_size(args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness for load balancers and `run_server`'s readiness wait (no key needed)."""
        return {"status": "ok"}

    @api.get("/v1/models", response_model=None)
    async def models(self, request: Request) -> ModelList | JSONResponse:
        """The model this application serves, and each of its adapters (multi-LoRA)."""
        try:
            self._authorize(request)
        except _Reject as reject:
            return reject.response
        return ModelList(data=[ModelCard(id=name) for name in self.args.served_models()])

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        self, request: Request
    ) -> ChatCompletionResponse | StreamingResponse | JSONResponse:
        """Answer a chat request: ``n`` choices, or one streamed choice."""
        try:
            req = await self._read(request, parse_chat_request)
            ticket = self._admit()
        except _Reject as reject:
            return reject.response
        streamed = False
        try:
            gen = await self._prepare(
                self.engine.prepare_chat, req.plain_messages(), req, tools=req.tool_dicts()
            )
            if req.stream:
                streamed = True
                return _event_stream(self._chat_events(req, gen), ticket)
            results = await self._generate(gen)
        except _Reject as reject:
            return reject.response
        finally:
            if not streamed:
                ticket.release()
        choices = []
        for i, r in enumerate(results):
            message, finish = self._answer(req, r)
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish))
        return ChatCompletionResponse(model=req.model, choices=choices, usage=_usage(results))

    @api.post("/v1/completions", response_model=None)
    async def completions(
        self, request: Request
    ) -> CompletionResponse | StreamingResponse | JSONResponse:
        """Continue a raw-text prompt (no chat template): ``n`` choices, or one streamed."""
        try:
            req = await self._read(request, parse_completion_request)
            ticket = self._admit()
        except _Reject as reject:
            return reject.response
        streamed = False
        try:
            gen = await self._prepare(self.engine.prepare_completion, req.prompt, req)
            if req.stream:
                streamed = True
                return _event_stream(self._completion_events(req, gen), ticket)
            results = await self._generate(gen)
        except _Reject as reject:
            return reject.response
        finally:
            if not streamed:
                ticket.release()
        return CompletionResponse(
            model=req.model,
            choices=[
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                for i, r in enumerate(results)
            ],
            usage=_usage(results),
        )

    # -- request intake ----------------------------------------------------------------------

    def _admit(self) -> Ticket:
        ticket = self.admission.enter()
        if ticket is None:
            raise _Reject(
                error_response(
                    429,
                    f"this replica is busy: {self.admission.capacity} requests are already "
                    "generating or queued (serve.max_ongoing_requests + "
                    "serve.max_queued_requests); retry after the Retry-After delay",
                    code="rate_limit_exceeded",
                    kind="requests",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            )
        return ticket

    def _authorize(self, request: Request) -> None:
        if self.api_keys is not None and not bearer_ok(
            request.headers.get("authorization"), self.api_keys
        ):
            raise _Reject(
                error_response(
                    401,
                    "missing or invalid API key: send the header 'Authorization: Bearer <key>' "
                    "with a key this server accepts",
                    code="invalid_api_key",
                )
            )

    async def _read(
        self, request: Request, parse: Callable[[bytes], ChatCompletionRequest | CompletionRequest]
    ) -> ChatCompletionRequest | CompletionRequest:
        """Authorize, read the body within its size limit, parse it and check the model."""
        self._authorize(request)
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type.split(";")[0].strip() != "application/json":
            raise _Reject(
                error_response(
                    415,
                    f"the body must be JSON, sent as Content-Type: application/json "
                    f"(got {content_type[:80]!r})",
                    code="unsupported_media_type",
                )
            )
        limit = self.args.max_request_bytes
        too_large = _Reject(
            error_response(
                413,
                f"the request body exceeds the server's limit of {limit} bytes: send less text",
                code="request_too_large",
            )
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:  # chunked uploads declare no length: count as they come
                raise too_large
        try:
            req = parse(bytes(body))
        except ProtocolError as exc:
            raise _Reject(error_response(400, exc.message, param=exc.param)) from exc
        served = self.args.served_models()
        if req.model not in served:
            raise _Reject(
                error_response(
                    404,
                    f"model {req.model!r} does not exist: this server serves "
                    + ", ".join(repr(name) for name in served),
                    param="model",
                    code="model_not_found",
                )
            )
        if isinstance(req, ChatCompletionRequest) and req.uses_tools():
            if self.args.tool_format is None:
                raise _Reject(
                    error_response(
                        400,
                        "tools are not supported by this model: its chat template has no tool "
                        "format (serve it with a rayft `template` that has one)",
                        param="tools",
                    )
                )
        cap = self.args.max_tokens_limit
        asked = req.max_new_tokens()
        if cap is not None and asked is not None and asked > cap:
            field = "max_completion_tokens" if asked != req.max_tokens else "max_tokens"
            raise _Reject(
                error_response(
                    400,
                    f"{field}={asked} exceeds this server's limit of {cap} tokens per completion: "
                    f"ask for at most {cap}",
                    param=field,
                )
            )
        return req

    async def _prepare(
        self,
        prepare: Callable[..., GenerationRequest],
        prompt: object,
        req: ChatCompletionRequest | CompletionRequest,
        **extra: object,
    ) -> GenerationRequest:
        """Render and tokenize off the event loop; the caller's mistakes become 400s.

        The request's `model` picks the adapter (multi-LoRA) the answer is generated with.
        """
        try:
            gen = await asyncio.to_thread(prepare, prompt, **req.sampling(), **extra)
            return dataclasses.replace(gen, adapter=self.args.served_models()[req.model])
        except RequestError as exc:
            raise _Reject(error_response(400, str(exc), param=exc.param)) from exc
        except ChatTemplateMissingError as exc:
            raise _Reject(error_response(500, str(exc), code="chat_template_missing")) from exc

    async def _generate(self, gen: GenerationRequest) -> list[ChatResult]:
        try:
            async with self.admission.active:
                if isinstance(self.engine, ContinuousBatching):
                    return await self.engine.generate_async(gen)
                return await self._generate_batch(gen)
        except Exception as exc:
            logger.exception("generation failed")
            raise _Reject(
                error_response(500, f"the engine failed: {type(exc).__name__}: {exc}")
            ) from exc

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, gens: list[GenerationRequest]) -> list[list[ChatResult]]:
        # Requests that arrived together are decoded together, off the event loop so that
        # health checks and new requests are still answered meanwhile.
        return await asyncio.to_thread(self.engine.generate, gens)

    def _answer(
        self, req: ChatCompletionRequest, result: ChatResult
    ) -> tuple[AssistantMessage, str]:
        """The assistant message and finish reason: tool calls when the answer makes some."""
        if not req.wants_tools():
            return AssistantMessage(content=result.text), result.finish_reason
        assert self.args.tool_format is not None  # checked in _read
        text, calls = parse_tool_calls(self.args.tool_format, result.text)
        # Special tokens were kept for the tags; the text a client sees has none.
        for token in self.engine.tokenizer.all_special_tokens:
            text = text.replace(token, "")
        if not calls:
            return AssistantMessage(content=text), result.finish_reason
        tool_calls = [
            ToolCallOut(function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
        ]
        return AssistantMessage(content=text or None, tool_calls=tool_calls), "tool_calls"

    # -- streams -----------------------------------------------------------------------------

    async def _chat_events(
        self, req: ChatCompletionRequest, gen: GenerationRequest
    ) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        head["model"] = req.model
        usage_field = {"usage": None} if req.include_usage() else {}

        def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return sse(ChatCompletionChunk(**head, choices=[choice], **usage_field))

        yield chunk(DeltaMessage(role="assistant", content=""))
        if req.wants_tools():
            # A tool call is only known once the answer is complete: generate it whole, then
            # send it as one delta (text or tool calls).
            results = await self._generate(gen)
            message, finish = self._answer(req, results[0])
            calls = message.tool_calls or []
            for index, call in enumerate(calls):
                call.index = index
            yield chunk(DeltaMessage(content=message.content, tool_calls=calls or None))
            yield chunk(DeltaMessage(), finish)
            if req.include_usage():
                yield sse(ChatCompletionChunk(**head, choices=[], usage=_usage(results)))
            yield SSE_DONE
            return
        async for step in self._deltas(gen):
            if step.text:
                yield chunk(DeltaMessage(content=step.text))
            if step.result is not None:
                yield chunk(DeltaMessage(), step.result.finish_reason)
                if req.include_usage():
                    yield sse(ChatCompletionChunk(**head, choices=[], usage=_usage([step.result])))
        yield SSE_DONE

    async def _completion_events(
        self, req: CompletionRequest, gen: GenerationRequest
    ) -> AsyncIterator[str]:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        head["model"] = req.model

        def chunk(text: str, finish: str | None = None) -> str:
            choice = CompletionChoice(index=0, text=text, finish_reason=finish)
            return sse(CompletionResponse(**head, choices=[choice]))

        async for step in self._deltas(gen):
            if step.text:
                yield chunk(step.text)
            if step.result is not None:
                yield chunk("", step.result.finish_reason)
                if req.include_usage():
                    yield sse(CompletionResponse(**head, choices=[], usage=_usage([step.result])))
        yield SSE_DONE

    async def _deltas(self, gen: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """The engine's stream, pulled off the event loop; a failure ends it with an error event.

        Closing this iterator (the client went away) cancels the engine's stream, which stops
        generation.
        """
        cancel = threading.Event()
        try:
            async with (
                self.admission.active,
                contextlib.aclosing(self._engine_stream(gen, cancel)) as steps,
            ):
                async for step in steps:
                    yield step
        except Exception as exc:
            logger.exception("streamed generation failed")
            detail = ErrorDetail(
                message=f"the engine failed: {type(exc).__name__}: {exc}", type="server_error"
            )
            # An HTTP status cannot change once streaming began: the error is the last event.
            raise _StreamFailed(sse(ErrorResponse(error=detail))) from exc
        finally:
            # A synchronous stream is stopped by `cancel`, not closed: a cancelled request may
            # leave `next` running in its thread.
            cancel.set()

    async def _engine_stream(
        self, gen: GenerationRequest, cancel: threading.Event
    ) -> AsyncIterator[StreamDelta]:
        """The engine's deltas on this event loop: a continuous-batching engine's own async
        stream (closed with this one, which aborts it), or a synchronous stream pulled step by
        step from a worker thread (stopped by `cancel`)."""
        if isinstance(self.engine, ContinuousBatching):
            async with contextlib.aclosing(self.engine.stream_async(gen)) as steps:
                async for step in steps:
                    yield step
            return
        steps = self.engine.stream(gen, cancel=cancel)
        while (step := await asyncio.to_thread(next, steps, None)) is not None:
            yield step


def build_app(args: dict | ServeArgs) -> serve.Application:
    """The Serve application for one model: what a RayService's ``import_path`` names.

    Args:
        args: `ServeArgs` or its fields as a dict (a RayService passes the dict).

    Returns:
        The bound application; each replica reserves ``num_cpus_per_replica`` CPUs, and
        there are ``num_replicas`` of them or as many as ``autoscaling`` decides.

    Raises:
        pydantic.ValidationError: `args` is not a valid `ServeArgs`.
    """
    serve_args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    return ChatServer.options(**deployment_options(serve_args)).bind(serve_args)


def deployment_options(args: ServeArgs) -> dict:
    """Ray Serve deployment options `args` implies: resources, replicas or autoscaling, queue.

    With a bound queue, Serve may route more requests to a replica than it holds, so that the
    excess reaches the app and gets its OpenAI-style 429 (`serve.admission`). Serve's own queue
    stays unbounded: under a burst its router briefly queues requests it has not yet assigned,
    and a bound there answered them with its plain-text 429 before any replica was full.
    """
    actor: dict = {"num_cpus": args.num_cpus_per_replica}
    custom = {k: v for k, v in args.resources_per_replica.items() if k != "GPU"}
    if "GPU" in args.resources_per_replica:
        actor["num_gpus"] = args.resources_per_replica["GPU"]
    if custom:
        actor["resources"] = custom
    options: dict = {
        "ray_actor_options": actor,
        "max_ongoing_requests": active_requests(args),
    }
    capacity = replica_capacity(args)
    if capacity is not None:
        options["max_ongoing_requests"] = serve_limit(capacity)
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = args.num_replicas or 1
    return options


def run_server(args: ServeArgs, *, blocking: bool) -> str:
    """Serve one model on the Ray cluster this process is connected to.

    Starts Serve with its HTTP proxy on ``args.host:args.port`` (on the head node), deploys
    the application under the name ``args.model_name`` at ``args.route_prefix`` and waits
    until it answers over HTTP.

    Args:
        args: the model and where to serve it.
        blocking: keep serving until interrupted (Ctrl-C deletes the application), instead
            of returning as soon as the server is ready.

    Returns:
        The OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.

    Raises:
        RuntimeError: Ray is not initialised, or the application failed to deploy.
        serve.auth.ApiKeyConfigError: API keys are configured but cannot be read.
        TimeoutError: the application is running but does not answer on ``host:port``
            (Serve was already started on this cluster with other HTTP options).
    """
    if not ray.is_initialized():
        raise RuntimeError(
            "run_server needs a Ray cluster: call ray.init(...) first (for a private local "
            "cluster bound to 127.0.0.1, use jobs.runtime.local_ray())"
        )
    load_api_keys(args)  # a key misconfiguration fails here, not in every replica's restarts
    # Only the first start of Serve on a cluster sets the proxy's host and port; later calls
    # keep the running proxy (Ray logs a warning), which the readiness wait then reports.
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": args.host, "port": args.port},
    )
    serve.run(build_app(args), name=args.model_name, route_prefix=args.route_prefix)
    root = f"http://{_local_host(args.host)}:{args.port}{args.route_prefix.rstrip('/')}"
    _wait_until_healthy(f"{root}/health", timeout_s=_READY_TIMEOUT_S)
    base_url = f"{root}/v1"
    print(f"rayft: serving {args.model_name!r} at {base_url}", flush=True)
    if blocking:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            serve.delete(args.model_name)
    return base_url


def _local_host(host: str) -> str:
    """The address a local client uses to reach a proxy listening on `host`."""
    if host in _LOCAL_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _wait_until_healthy(url: str, *, timeout_s: float) -> None:
    """Poll `url` until it answers 200: the proxy learns new routes a moment after deploy."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise TimeoutError(
        f"the application is deployed but {url} did not answer within {timeout_s:.0f}s "
        f"(last: {last_error}); if Serve was already running on this cluster, it kept its "
        "own HTTP host/port: serve.shutdown() first or use that port"
    )
