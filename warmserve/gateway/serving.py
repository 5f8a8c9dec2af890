"""Chat and text completions: validate, tokenize, submit, then stream or collect.

Handlers reach the serving runtime only through `EngineClient`. Per-request state lives in
locals. Whatever ends a request early (client gone, stop string, error) aborts it in the
runtime, which frees its KV at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from warmserve.clock import unix_time
from warmserve.engine.request import SamplingParams
from warmserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, error_body
from warmserve.gateway.text import IncrementalText
from warmserve.runtime.requests import (
    Overloaded,
    RuntimeRequest,
    ShuttingDown,
    StreamError,
    TokenDelta,
)


class EngineClient(Protocol):
    @property
    def accepting(self) -> bool: ...

    def submit(
        self, model: str, prompt_ids: list[int], params: SamplingParams
    ) -> RuntimeRequest: ...

    def abort(self, request_id: int) -> None: ...

    def model_state(self, name: str) -> str: ...

    def admin_view(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    tokenizer: Any
    max_model_len: int
    created: int


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, param, code)


@dataclass(slots=True)
class _Prepared:
    model: ModelCard
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    include_usage: bool
    stream: bool


class OpenAIServing:
    def __init__(self, engine: EngineClient, models: list[ModelCard], default_max_tokens: int):
        self.engine = engine
        self.models = {m.name: m for m in models}
        self.default_max_tokens = default_max_tokens

    # ----- preparing --------------------------------------------------------------------
    def _model(self, name: str) -> ModelCard:
        card = self.models.get(name)
        if card is None:
            raise ApiError(
                404,
                f"The model `{name}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )
        return card

    def _prepare(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        ids: list[int],
        card: ModelCard,
        max_tokens: int | None,
    ) -> _Prepared:
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(
                400, "presence and frequency penalties are not supported", param="presence_penalty"
            )
        room = card.max_model_len - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {card.max_model_len} "
                f"tokens; the prompt has {len(ids)} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        if max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {card.max_model_len} "
                f"tokens; the prompt ({len(ids)}) plus max_tokens ({max_tokens}) "
                "exceeds it.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        include = bool(body.stream_options and body.stream_options.include_usage)
        return _Prepared(card, ids, params, body.stop_strings(), include, body.stream)

    def prepare_chat(self, body: ChatCompletionRequest) -> _Prepared:
        card = self._model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = card.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # a template that rejects the conversation (e.g. roles)
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens
        return self._prepare(body, list(ids), card, max_tokens)

    def prepare_completion(self, body: CompletionRequest) -> _Prepared:
        card = self._model(body.model)
        if body.echo or body.logprobs is not None:
            raise ApiError(400, "echo and logprobs are not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = card.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            vocab = len(card.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return self._prepare(body, ids, card, body.max_tokens)

    def submit(self, prep: _Prepared) -> RuntimeRequest:
        try:
            return self.engine.submit(prep.model.name, prep.prompt_ids, prep.params)
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_error") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), "server_error") from None

    # ----- running ----------------------------------------------------------------------
    async def events(
        self, req: RuntimeRequest, prep: _Prepared
    ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason) until the end; raises ApiError on a runtime error.
        Aborts the request in the runtime if the consumer stops early."""
        text = IncrementalText(prep.model.tokenizer, prep.stop)
        finished = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, StreamError):
                    finished = True
                    raise ApiError(item.status, item.message, item.kind)
                assert isinstance(item, TokenDelta)
                delta = text.push(item.token_ids)
                if text.stopped:
                    finished = True
                    self.engine.abort(req.request_id)
                    yield delta, "stop"
                    return
                if item.finish_reason is not None:
                    finished = True
                    yield delta + text.flush(), item.finish_reason
                    return
                if delta:
                    yield delta, None
        finally:
            if not finished:
                self.engine.abort(req.request_id)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def collect(events: AsyncIterator[tuple[str, str | None]]) -> tuple[str, str]:
    """The whole text and the finish reason of a non-streamed request."""
    parts, reason = [], "stop"
    async for delta, fin in events:
        parts.append(delta)
        if fin is not None:
            reason = fin
    return "".join(parts), reason


def chat_response(rid: str, model: str, text: str, reason: str, req: RuntimeRequest) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": unix_time(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        ],
        "usage": usage(len(req.prompt_ids), req.generated),
    }


def completion_response(rid: str, model: str, text: str, reason: str, req: RuntimeRequest) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": unix_time(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        "usage": usage(len(req.prompt_ids), req.generated),
    }


async def stream_sse(
    req: RuntimeRequest,
    prep: _Prepared,
    chunk: Callable[[str, str | None, bool], dict],
    first: tuple[str, str | None],
    events: AsyncIterator[tuple[str, str | None]],
    rid: str,
) -> AsyncIterator[str]:
    """SSE lines: a role chunk, the first event (already awaited), one chunk per further
    text delta, the finish, usage, [DONE]."""
    try:
        yield sse(chunk("", None, True))
        yield sse(chunk(first[0], first[1], False))
        if first[1] is None:
            async for delta, fin in events:
                yield sse(chunk(delta, fin, False))
    except ApiError as e:  # headers are sent: the error travels as an event
        yield sse(e.body)
        yield "data: [DONE]\n\n"
        return
    finally:
        await events.aclose()  # a client gone mid-stream: the request is aborted here
    if prep.include_usage:
        yield sse(
            {
                "id": rid,
                "object": chunk("", None, False)["object"],
                "created": unix_time(),
                "model": prep.model.name,
                "choices": [],
                "usage": usage(len(req.prompt_ids), req.generated),
            }
        )
    yield "data: [DONE]\n\n"


async def first_event(
    events: AsyncIterator[tuple[str, str | None]],
) -> tuple[str, str | None] | None:
    """The first event, so an error before any output still gets a real HTTP status."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def wait_disconnect(receive: Callable[[], Any]) -> None:
    """Returns when the client disconnects (the request body was already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(coro: Any, receive: Callable[[], Any]) -> Any:
    """Run `coro` unless the client goes away first; then cancel it (its `finally` aborts)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return None
