"""The OpenAI-compatible HTTP server: FastAPI inside a Ray Serve deployment.

Routes (relative to ``ServeArgs.route_prefix``): ``GET /v1/models``,
``POST /v1/chat/completions``, ``GET /health``. Every error is an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``) with a status the official clients map
to their exception classes: 400 bad request, 404 unknown model or route, 500 engine failure.

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
import logging
import threading
import time
import urllib.error
import urllib.request

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.args import ServeArgs
from serve.engine import ChatTemplateMissingError, RequestError, TransformersEngine
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    Usage,
    parse_chat_request,
)

logger = logging.getLogger(__name__)

# Hosts that mean "this machine": the returned URL and the readiness probe use loopback.
_LOCAL_HOSTS = {"0.0.0.0", "::", "localhost", "127.0.0.1"}
_READY_TIMEOUT_S = 60.0

api = FastAPI(title="rayft", summary="OpenAI-compatible chat completions for rayft models")


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An OpenAI error body with its HTTP status.

    Args:
        status: HTTP status (400, 404, 500 …).
        message: what went wrong and, for the caller's errors, how to fix it.
        param: the request field at fault.
        code: a machine-readable code (``model_not_found`` …).

    Returns:
        The JSON response.
    """
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the OpenAI shape too.
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


@serve.deployment
@serve.ingress(api)
class ChatServer:
    """One replica: a `TransformersEngine` behind the OpenAI routes."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.engine = TransformersEngine(args)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness for load balancers and `run_server`'s readiness wait."""
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        """The one model this application serves."""
        return ModelList(data=[ModelCard(id=self.args.model_name)])

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> ChatCompletionResponse | JSONResponse:
        """Answer one chat request (no streaming, one choice)."""
        try:
            req = parse_chat_request(await request.body())
        except ProtocolError as exc:
            return error_response(400, exc.message, param=exc.param)
        if req.model != self.args.model_name:
            return error_response(
                404,
                f"model {req.model!r} does not exist: this server serves {self.args.model_name!r}",
                param="model",
                code="model_not_found",
            )
        try:
            # Off the event loop: generation takes seconds and health checks must still answer.
            result = await asyncio.to_thread(
                self.engine.chat,
                req.plain_messages(),
                max_tokens=req.max_new_tokens(),
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
                seed=req.seed,
            )
        except RequestError as exc:
            return error_response(400, str(exc), param=exc.param)
        except ChatTemplateMissingError as exc:
            return error_response(500, str(exc), code="chat_template_missing")
        except Exception as exc:
            logger.exception("chat completion failed")
            return error_response(500, f"the engine failed: {type(exc).__name__}: {exc}")
        return ChatCompletionResponse(
            model=self.args.model_name,
            choices=[
                ChatChoice(
                    index=0,
                    message=AssistantMessage(content=result.text),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
        )


def build_app(args: dict | ServeArgs) -> serve.Application:
    """The Serve application for one model: what a RayService's ``import_path`` names.

    Args:
        args: `ServeArgs` or its fields as a dict (a RayService passes the dict).

    Returns:
        The bound application; each replica reserves ``num_cpus_per_replica`` CPUs.

    Raises:
        pydantic.ValidationError: `args` is not a valid `ServeArgs`.
    """
    serve_args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    deployment = ChatServer.options(ray_actor_options={"num_cpus": serve_args.num_cpus_per_replica})
    return deployment.bind(serve_args)


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
        TimeoutError: the application is running but does not answer on ``host:port``
            (Serve was already started on this cluster with other HTTP options).
    """
    if not ray.is_initialized():
        raise RuntimeError(
            "run_server needs a Ray cluster: call ray.init(...) first (for a private local "
            "cluster bound to 127.0.0.1, use cluster.runtime.local_ray())"
        )
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
