"""What the runtime and a worker process say to each other over their pipe (pickled).

Commands run on the worker in the order sent; that order is what lets the runtime send
`AddRequest` right after `Activate` (the request waits in the worker, not in a poll loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.engine.request import SamplingParams


# ----- runtime -> worker ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Prewarm:
    name: str
    model_dir: str
    token: int  # echoed in `Loaded`, so a stale load is never taken for a newer one


@dataclass(frozen=True, slots=True)
class Evict:
    name: str


@dataclass(frozen=True, slots=True)
class Activate:
    name: str
    model_dir: str  # loaded first (a cold start) when not resident


@dataclass(frozen=True, slots=True)
class Deactivate:
    keep_weights: bool


@dataclass(frozen=True, slots=True)
class SetKvPages:
    """Lend (fewer) or reclaim (more) KV pages so that `pages` stay mapped in the KV slot."""

    pages: int


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


Command = (
    Prewarm | Evict | Activate | Deactivate | SetKvPages | AddRequest | AbortRequest | Shutdown
)


# ----- worker -> runtime ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    num_pages: int
    page_bytes: int


@dataclass(frozen=True, slots=True)
class Loaded:
    name: str
    token: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Activated:
    name: str
    kv_blocks: int
    block_bytes: int
    seconds: float  # activation alone (a cold start's load is not included)


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """One engine step's new tokens: (request id, token ids, finish reason or None)."""

    items: tuple[tuple[int, tuple[int, ...], str | None], ...]
    kv_used_blocks: int
    waiting: int = 0  # requests queued in the engine (e.g. for KV blocks)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: int
    message: str


@dataclass(frozen=True, slots=True)
class CommandFailed:
    command: str
    message: str


Event = Ready | Loaded | Activated | TokenBatch | RequestFailed | CommandFailed
