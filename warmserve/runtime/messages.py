"""What the runtime and a worker process say to each other over their pipe (pickled).

The worker's commands are named apart from the controller's actions (`Prewarm`, `Evict`,
`SetKvPages` in `control/api.py`), which reach a worker only as the books' effects.
Commands run on the worker in the order sent; that order is what lets the runtime send
`AddRequest` right after `Activate` (the request waits in the worker, not in a poll loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.engine.request import SamplingParams, TokenLogprobs


# ----- runtime -> worker ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadModel:
    """Load a model's weights into a slot in the background (a prewarm)."""

    name: str
    model_dir: str
    token: int  # echoed in `Loaded`, so a stale load is never taken for a newer one
    tp_rank: int = 0  # this worker's shard of a TP replica
    tp_size: int = 1


@dataclass(frozen=True, slots=True)
class UnloadModel:
    """Free a model's weights (cancelling a load still running)."""

    name: str


@dataclass(frozen=True, slots=True)
class Activate:
    name: str
    model_dir: str  # loaded first (a cold start) when not resident
    instance_id: int = -1  # echoed in `Activated`: a late one never marks a newer instance
    # A TP instance: the node-local ranks of its workers (a pre-built group), lowest first;
    # this worker is the leader (hosts the scheduler, takes requests) if it is the first.
    group: tuple[int, ...] = ()
    rank: int = 0  # this worker's place in `group`
    kv_pages: int | None = None  # the books' KV pages per worker (TP: the same on every rank)


@dataclass(frozen=True, slots=True)
class Deactivate:
    keep_weights: bool


@dataclass(frozen=True, slots=True)
class MapKvPages:
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
class GroupKv:
    """Out of band (not queued): how many of a TP instance's `MapKvPages` each rank has
    finished, by rank, as reported so far (every rank gets the same ones, in the same order).
    A follower lends pages in its k-th resize only once the leader (which alone allocates
    blocks) has finished its k-th; the leader uses pages reclaimed in its k-th resize only
    once every follower has finished its k-th. Counting resizes, not comparing page counts,
    keeps this right when a lend and a reclaim follow each other quickly."""

    instance_id: int
    done: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


Command = (
    LoadModel
    | UnloadModel
    | Activate
    | Deactivate
    | MapKvPages
    | AddRequest
    | AbortRequest
    | GroupKv
    | Shutdown
)


# ----- worker -> runtime ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    num_pages: int
    page_bytes: int
    tp_groups: int = 0  # the node's aligned TP groups this worker belongs to, built before this
    tp_groups_s: float = 0.0  # joining the node's world and building them (wall clock)


@dataclass(frozen=True, slots=True)
class Loaded:
    name: str
    token: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Activated:
    name: str
    instance_id: int
    kv_blocks: int
    block_bytes: int
    seconds: float  # activation alone (a cold start's load is not included)


@dataclass(frozen=True, slots=True)
class TokenOut:
    """One request's new tokens from one engine step."""

    request_id: int
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | None while running
    logprobs: tuple[TokenLogprobs, ...] | None = None  # one per token, when asked for
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # with the first token, if asked


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """One engine step's new tokens, and the engine's KV use and queue after it."""

    items: tuple[TokenOut, ...]
    kv_used_blocks: int
    waiting: int = 0  # requests queued in the engine (e.g. for KV blocks)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The worker dropped a request: refused at admission, or its step failed. The worker
    goes on serving; the request must not be retried (it would fail the same way)."""

    request_id: int
    message: str  # written by the worker for the client: no exception text
    refused: bool = False  # True: refused at admission (e.g. too large for the KV cache)


@dataclass(frozen=True, slots=True)
class StepFailed:
    """An engine step raised past the engine's own isolation; its requests were dropped
    (each reported by `RequestFailed`) and the worker serves on."""

    detail: str


@dataclass(frozen=True, slots=True)
class KvMapped:
    """A rank of a TP instance finished its `done`-th `MapKvPages` since the activation."""

    instance_id: int
    done: int


@dataclass(frozen=True, slots=True)
class CommandFailed:
    command: str
    message: str


Event = (
    Ready | Loaded | Activated | TokenBatch | RequestFailed | StepFailed | KvMapped | CommandFailed
)
