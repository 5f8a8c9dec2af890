"""The FastAPI app: thin routes over `OpenAIServing`, OpenAI-style errors, auth, size limits."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warmserve.clock import unix_time
from warmserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, error_body
from warmserve.gateway.serving import (
    ApiError,
    OpenAIServing,
    chat_response,
    collect,
    completion_response,
    first_event,
    new_id,
    race_disconnect,
    stream_sse,
)

OPEN_PATHS = ("/health", "/metrics")  # never behind an API key


class BodyLimit:
    """413 for bodies over `max_bytes`, counted as they arrive (chunked bodies included)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = JSONResponse(
        error_body(f"request body exceeds {max_bytes} bytes", "invalid_request_error"), 413
    )
    await body(  # type: ignore[arg-type]
        {"type": "http"}, _no_receive, send
    )


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


def _json_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status)


def build_app(
    serving: OpenAIServing,
    metrics_text: Callable[[], bytes],
    api_keys: list[str],
    max_request_bytes: int,
    on_startup: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
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

    app = FastAPI(title="WarmServe", lifespan=lifespan, docs_url=None, redoc_url=None)
    engine = serving.engine
    keys = [k.encode() for k in api_keys]

    @app.middleware("http")
    async def auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if keys and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            token = header[7:].encode() if header.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(token, k) for k in keys):
                return JSONResponse(
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
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        text = f"{where}: {msg}" if where else msg
        return JSONResponse(error_body(text, "invalid_request_error", where), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), e.status_code)

    @app.get("/health")
    async def health() -> Response:
        if engine.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
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

    @app.get("/admin/cluster")
    async def admin() -> dict[str, Any]:
        return engine.admin_view()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        prep = serving.prepare_chat(body)
        return await _run(request, prep, "chatcmpl", _chat_chunk, chat_response)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prep = serving.prepare_completion(body)
        return await _run(request, prep, "cmpl", _text_chunk, completion_response)

    async def _run(
        request: Request, prep: Any, prefix: str, chunk_of: Any, full_of: Any
    ) -> Response:
        rid = new_id(prefix)
        req = serving.submit(prep)
        events = serving.events(req, prep)
        name = prep.model.name
        created = unix_time()
        if prep.stream:
            # Wait for the first output (or error) so that a failure before any token still
            # gets a real HTTP status; the client's disconnect meanwhile aborts the request.
            first = await race_disconnect(first_event(events), request.receive)
            if first is None:
                await events.aclose()
                return Response(status_code=499)

            def chunk(text: str, fin: str | None, role: bool) -> dict[str, Any]:
                return chunk_of(rid, name, created, text, fin, role)

            return StreamingResponse(
                stream_sse(req, prep, chunk, first, events, rid),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await race_disconnect(collect(events), request.receive)
        finally:
            await events.aclose()
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        text, reason = result
        return JSONResponse(full_of(rid, name, text, reason, req))

    return BodyLimit(app, max_request_bytes)


def _chat_chunk(
    rid: str, model: str, created: int, text: str, fin: str | None, role: bool
) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}],
    }


def _text_chunk(
    rid: str, model: str, created: int, text: str, fin: str | None, role: bool
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": fin}],
    }
