"""Per-request state and sampling parameters (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

# What torch's generators take as a seed: the 64-bit signed range (as OpenAI's API documents).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and top k
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        # `not (...)` so that NaN fails too.
        if not (0 <= self.temperature < math.inf) or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need finite temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must lie in [{SEED_MIN}, {SEED_MAX}]")
        if (self.logprobs or 0) < 0 or (self.prompt_logprobs or 0) < 0:
            raise ValueError("logprobs and prompt_logprobs must be >= 0")


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities of the model's distribution (before temperature, top-k and top-p)."""

    logprob: float  # of the chosen token
    top: tuple[tuple[int, float], ...]  # the most likely tokens, best first


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    finish_reason: FinishReason | None = None
    # Log-probabilities of prompt tokens 1.. as their positions are computed (kept across a
    # preemption, so a recomputation does not redo them).
    prompt_lp: list[TokenLogprobs] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
