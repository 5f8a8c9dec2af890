"""The FastAPI app: thin routes over `OpenAIServing`, OpenAI-style errors, auth, size limits."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warmserve.gateway.protocol import (
    BodyError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    error_body,
)
from warmserve.gateway.responses import collect_all, first_events, response, stream_sse
from warmserve.gateway.serving import ApiError, OpenAIServing, new_id, race_disconnect

OPEN_PATHS = ("/health", "/metrics")  # never behind an API key


class BodyLimit:
    """413 for a body over `max_bytes`, chunked or not, and 408 for one that does not arrive
    within `timeout_s`. The body is read here (memory stays bounded by the limit) and handed
    to the app whole, so the app never sees a partial body."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _reply(send, 413, f"request body exceeds {self.max_bytes} bytes")
            return
        parts, seen = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its body
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.max_bytes:
                        await _reply(send, 413, f"request body exceeds {self.max_bytes} bytes")
                        return
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _reply(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
            return
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, for streaming handlers

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, message: str) -> None:
    resp = SafeJSONResponse(
        error_body(message, "invalid_request_error"), status, headers={"Connection": "close"}
    )
    await resp({"type": "http"}, _no_receive, send)  # type: ignore[arg-type]


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: text that cannot be UTF-8 (a lone surrogate echoed from a
    request) is replaced rather than turning an error reply into a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def _json_error(e: ApiError) -> JSONResponse:
    return SafeJSONResponse(e.body, status_code=e.status)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the field and the problem, for the first error pydantic found."""
    errors = e.errors()
    first = errors[0] if errors else {}
    ctx = first.get("ctx") or {}
    if isinstance(ctx.get("error"), BodyError):
        err: BodyError = ctx["error"]
        return _short(err.message, 400), _short(err.param, 100)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = _short(".".join(loc), 100) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}", where
    if kind == "finite_number":
        return f"{where}: must be a finite number", where
    msg = str(first.get("msg", "invalid request"))
    return (f"{where}: {msg}" if where else msg), where


_ERRORS = {
    400: "Invalid request: the message names the field and the problem",
    401: "Missing or wrong API key (when keys are configured)",
    404: "Unknown model",
    408: "The request body did not arrive in time",
    413: "The request body exceeds limits.max_request_bytes",
    429: "The model's queue is full (limits.max_queued_requests)",
    500: "The engine failed on this request",
    502: "The worker serving the request died after it had produced tokens",
    503: "No instance within limits.queue_timeout_s, or the server is shutting down",
}


def _responses(*codes: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes
    }
    if stream:
        out[200] = {
            "description": "A JSON completion, or with `stream: true` server-sent events "
            "(`data: {chunk}` lines, then `data: [DONE]`)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    return out


def build_app(
    serving: OpenAIServing,
    metrics_text: Callable[[], bytes],
    api_keys: list[str],
    max_request_bytes: int,
    on_startup: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
    body_timeout_s: float = 30.0,
) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="WarmServe",
        summary="An OpenAI-compatible API over many models on shared accelerators",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
    )
    engine = serving.engine
    keys = [k.encode() for k in api_keys]

    @app.middleware("http")
    async def auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if keys and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            token = header[7:].encode() if header.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(token, k) for k in keys):
                return SafeJSONResponse(
                    error_body(
                        "invalid or missing API key", "authentication_error", code="invalid_api_key"
                    ),
                    401,
                )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _json_error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        text, where = _validation_message(e)
        return SafeJSONResponse(error_body(text, "invalid_request_error", where), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return SafeJSONResponse(
            error_body(str(e.detail), kind), e.status_code, headers=getattr(e, "headers", None)
        )

    @app.get("/health", responses={503: {"description": "The server is shutting down"}})
    async def health() -> Response:
        if engine.accepting:
            return SafeJSONResponse({"status": "ok"})
        return SafeJSONResponse({"status": "unavailable"}, 503)

    prometheus = {200: {"description": "Prometheus text exposition format 0.0.4"}}

    @app.get("/metrics", response_class=PlainTextResponse, responses=prometheus)
    async def metrics() -> Response:
        return Response(metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=_responses(401))
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": m.created,
                    "owned_by": "warmserve",
                    "max_model_len": m.max_model_len,
                    "state": engine.model_state(m.name),
                }
                for m in serving.models.values()
            ],
        }

    @app.get("/admin/cluster", responses=_responses(401))
    async def admin() -> dict[str, Any]:
        return engine.admin_view()

    completion_errors = _responses(400, 401, 404, 408, 413, 429, 500, 502, 503, stream=True)

    @app.post("/v1/chat/completions", responses=completion_errors)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await _run(request, body, "chatcmpl")

    @app.post("/v1/completions", responses=completion_errors)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _run(request, body, "cmpl")

    async def _run(
        request: Request, body: ChatCompletionRequest | CompletionRequest, prefix: str
    ) -> Response:
        prep = await serving.prepare(body)
        rid = new_id(prefix)
        reqs = serving.submit(prep)
        streams = [serving.events(r, prep) for r in reqs]
        if prep.stream:
            # Wait for each choice's first output (or error) so that a failure before any
            # token still gets a real HTTP status; the client's disconnect aborts meanwhile.
            try:
                firsts = await race_disconnect(first_events(streams), request.receive)
            except BaseException:
                for s in streams:
                    await s.aclose()
                raise
            if firsts is None:
                for s in streams:
                    await s.aclose()
                return Response(status_code=499)
            return StreamingResponse(
                stream_sse(rid, prep, reqs, streams, firsts),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results = await race_disconnect(collect_all(streams), request.receive)
        if results is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return SafeJSONResponse(response(rid, prep, results, reqs))

    def openapi() -> dict[str, Any]:
        """FastAPI's document, less its default 422 (this server answers 400 instead)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version="1", summary=app.summary,
                              routes=app.routes)  # fmt: skip
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return BodyLimit(app, max_request_bytes, body_timeout_s)
