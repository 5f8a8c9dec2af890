"""Per-request state shared by the runtime and the gateway (no torch, no HTTP)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from warmserve.engine.request import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class TokenDelta:
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | None while running
    logprobs: tuple[TokenLogprobs, ...] | None = None  # one per token, when asked for
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # with the first token, if asked


@dataclass(frozen=True, slots=True)
class StreamError:
    status: int  # the HTTP status it maps to when nothing was sent yet
    message: str
    kind: str = "server_error"


StreamItem = TokenDelta | StreamError


class Overloaded(RuntimeError):
    """The model's queue is full (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server no longer accepts requests (HTTP 503)."""


@dataclass(slots=True)
class RuntimeRequest:
    request_id: int
    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival_s: float
    queue: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    instance_id: int | None = None  # set when dispatched
    worker_id: int | None = None
    generated: int = 0
    first_token_s: float | None = None
    retried: bool = False
    done: bool = False
