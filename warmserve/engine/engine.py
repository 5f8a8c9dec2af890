"""The engine loop: schedule → forward → sample → update.

One request's failure never takes the others down: a sampling error (e.g. non-finite logits)
drops that request alone, and a failed forward pass drops the requests of that step; both are
reported in the step's output, and the engine goes on serving.

Tensor parallelism (`tp`): the engine of each rank runs over that rank's shard of the weights
and its own KV cache. The leader's (rank 0) is the engine the runtime drives as on one device:
`add`, `step`, `abort`, its scheduler deciding the block ids of every rank. A follower's engine
only runs `follow()` in a loop, which returns False once the leader calls `stop_followers()`.
A forward failing on any rank fails the step on every rank, the leader dropping its requests
as above; a broken group raises `lockstep.TPBroken` (see `engine.lockstep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from warmserve.engine.llama import PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.lockstep import Lockstep, StepFailed, TPBroken
from warmserve.engine.request import Request, SamplingParams, TokenLogprobs
from warmserve.engine.scheduler import Scheduler, SchedulerOutput
from warmserve.engine.tp import TPGroup

# Below this temperature sampling is greedy: dividing logits by a tiny temperature overflows,
# and the distribution is a point mass on the argmax anyway (vLLM uses the same threshold).
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """The logits of one request cannot be sampled (non-finite values)."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    tokens: dict[int, int] = field(default_factory=dict)  # request id -> sampled token
    finished: dict[int, str] = field(default_factory=dict)  # request id -> "stop" | "length"
    failed: dict[int, str] = field(default_factory=dict)  # request id -> why (it was dropped)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    finished_requests: tuple[Request, ...] = ()
    kv_used_blocks: int = 0
    num_waiting: int = 0  # requests queued in the engine (e.g. for KV blocks)
    # With a request's first token, when asked for: prompt tokens 1.. (token 0 has none).
    prompt_logprobs: dict[int, tuple[TokenLogprobs, ...]] = field(default_factory=dict)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    # On the host: the request's generator is a CPU one, and one row is cheap to move. fp32
    # holds any logit / GREEDY_BELOW; softmax subtracts the maximum first.
    logits = logits.float().cpu()
    if not bool(torch.isfinite(logits).all()):
        raise SamplingError("the model produced non-finite logits")
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # smallest set reaching top_p
        keep[0] = True  # however small top_p is, the most likely token stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(lp, min(top, lp.numel())) if top else None
    pairs = () if best is None else tuple(
        zip(best.indices.tolist(), best.values.tolist(), strict=True)
    )  # fmt: skip
    return TokenLogprobs(float(lp[token]), pairs)


class Engine:
    def __init__(
        self,
        model: PagedLlama,
        cache: PagedKVCache,
        scheduler: Scheduler,
        eos_token_id: int | None,
        tp: TPGroup | None = None,
    ) -> None:
        """`tp`: this rank's group, the model and cache being its shard's. The leader's
        scheduler must hand out only blocks every rank's cache holds
        (`lockstep.agree_num_blocks`); a follower's scheduler is kept for the KV books only."""
        self.model = model
        self.cache = cache
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self.tp = tp
        self._lockstep = Lockstep(tp, model, cache) if tp is not None and tp.size > 1 else None
        self._gens: dict[int, torch.Generator] = {}
        self._next_id = 0

    @property
    def is_follower(self) -> bool:
        return self.tp is not None and not self.tp.is_leader

    def follow(self) -> bool:
        """A follower: run this rank's part of the leader's next step (blocking until it
        comes); False once the leader has called `stop_followers`. A step that failed on some
        rank returns True like any other: the leader reports it, and the ranks stay in step."""
        if self._lockstep is None or not self.is_follower:
            raise RuntimeError("follow() runs on the follower ranks of a TP group only")
        try:
            return self._lockstep.follow()
        except StepFailed:
            return True

    def stop_followers(self) -> None:
        """The leader: release every follower from `follow()` (once; then no more steps)."""
        if self._lockstep is None or self.is_follower:
            raise RuntimeError("stop_followers() runs on the leader of a TP group only")
        self._lockstep.stop()

    def _forward(self, seqs: list[SeqInput], rows: list[int] | None) -> torch.Tensor:
        if self._lockstep is None:
            return self.model.forward(seqs, self.cache, rows)
        return self._lockstep.lead(seqs, rows)

    def add(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: int | None = None
    ) -> int:
        """Queue a request under the caller's id (or a fresh one); nothing is queued if this
        raises."""
        rid = self._next_id if request_id is None else request_id
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid} is already in the engine")
        # The generator first: a seed torch cannot take must not leave a queued request behind.
        gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.scheduler.add(Request(rid, list(prompt_ids), params))
        self._next_id = max(self._next_id, rid + 1)
        if gen is not None:
            self._gens[rid] = gen
        return rid

    def abort(self, request_id: int) -> None:
        self.scheduler.abort(request_id)
        self._gens.pop(request_id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def has_request(self, request_id: int) -> bool:
        return request_id in self.scheduler.requests

    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.alloc.num_blocks

    def usage(self) -> tuple[int, int]:
        """KV blocks in use, and requests waiting in the engine (e.g. for KV blocks)."""
        return self.scheduler.alloc.num_used, len(self.scheduler.waiting)

    def abort_all(self) -> list[int]:
        ids = list(self.scheduler.requests)
        for rid in ids:
            self.abort(rid)
        return ids

    def step(self) -> StepOutput:
        """One engine step: the tokens sampled, the requests finished and those dropped."""
        if self.is_follower:
            raise RuntimeError("a follower rank does not step; it runs follow()")
        out = self.scheduler.schedule()
        if not out.seqs:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with requests pending")
            return self._output({}, [], {}, {})
        rows, last, want_prompt = self._rows(out)
        try:
            logits = self._forward(
                [SeqInput(s.token_ids, s.start, s.block_table) for s in out.seqs], rows
            )
            if want_prompt:
                self._prompt_logprobs(out, logits, want_prompt)
                logits = logits[last]
        except Exception as e:  # the whole step is lost: drop its requests, keep serving
            if isinstance(e, TPBroken):
                raise  # no step can run any more: the instance must go
            why = type(e).__name__ if not isinstance(e, StepFailed) else str(e)
            failed = {s.request_id: f"the engine step failed ({why})" for s in out.seqs}
            for rid in failed:
                self.abort(rid)
            return self._output({}, [], failed, {})
        greedy = logits.argmax(-1).tolist()  # one call for all greedy rows
        sampled: dict[int, int] = {}
        failed: dict[int, str] = {}
        logprobs: dict[int, TokenLogprobs] = {}
        for i, (row, seq) in enumerate(zip(logits, out.seqs, strict=True)):
            if not seq.samples:
                continue
            rid = seq.request_id
            p = self.scheduler.requests[rid].params
            try:
                tok = (
                    greedy[i]
                    if p.temperature < GREEDY_BELOW
                    else sample(row, p, self._gens.get(rid))
                )
                if p.logprobs is not None:
                    logprobs[rid] = token_logprobs(row, tok, p.logprobs)
            except Exception as e:  # this request alone
                failed[rid] = str(e) if isinstance(e, SamplingError) else (
                    f"sampling failed ({type(e).__name__})")  # fmt: skip
                continue
            sampled[rid] = tok
        if failed:
            for rid in failed:
                self.abort(rid)
            out = SchedulerOutput(
                tuple(s for s in out.seqs if s.request_id not in failed), out.preempted
            )
        prompt_lps = {
            rid: tuple(self.scheduler.requests[rid].prompt_lp)
            for rid in sampled
            if self.scheduler.requests[rid].params.prompt_logprobs is not None
            and not self.scheduler.requests[rid].output_ids
        }  # delivered with a request's first token
        finished = self.scheduler.update(out, sampled, self.eos_token_id)
        for req in finished:
            self._gens.pop(req.request_id, None)
        return self._output(sampled, finished, failed, logprobs, prompt_lps)

    def _rows(self, out: SchedulerOutput) -> tuple[list[int] | None, list[int], dict[int, int]]:
        """Which token rows need logits: each sequence's last, and every row of a chunk
        whose prompt log-probabilities are still owed. (None: only the last rows.) Also
        where each sequence's last row lands, and the first row of each owed chunk."""
        rows: list[int] = []
        last: list[int] = []
        want: dict[int, int] = {}  # sequence index -> first row of its chunk in `rows`
        base = 0
        for n, seq in enumerate(out.seqs):
            req = self.scheduler.requests[seq.request_id]
            width = len(seq.token_ids)
            owed = req.params.prompt_logprobs is not None and (
                len(req.prompt_lp) < len(req.prompt_ids) - 1
                and seq.start + width > len(req.prompt_lp)  # ...and this chunk predicts some
            )
            if owed:
                want[n] = len(rows)
                rows.extend(range(base, base + width))
            else:
                rows.append(base + width - 1)
            last.append(len(rows) - 1)
            base += width
        return (rows if want else None), last, want

    def _prompt_logprobs(
        self, out: SchedulerOutput, logits: torch.Tensor, want: dict[int, int]
    ) -> None:
        """Row j of a chunk predicts prompt token `start + j + 1`."""
        for n, first in want.items():
            seq = out.seqs[n]
            req = self.scheduler.requests[seq.request_id]
            top = req.params.prompt_logprobs or 0
            for j in range(len(seq.token_ids)):
                pos = seq.start + j + 1
                if pos >= len(req.prompt_ids):
                    break
                if pos == len(req.prompt_lp) + 1:  # in order, each once
                    req.prompt_lp.append(
                        token_logprobs(logits[first + j], req.prompt_ids[pos], top)
                    )

    def _output(
        self,
        sampled: dict[int, int],
        finished: list[Request],
        failed: dict[int, str],
        logprobs: dict[int, TokenLogprobs],
        prompt_logprobs: dict[int, tuple[TokenLogprobs, ...]] | None = None,
    ) -> StepOutput:
        sched = self.scheduler
        return StepOutput(
            sampled,
            {r.request_id: str(r.finish_reason) for r in finished},
            failed,
            logprobs,
            tuple(finished),
            sched.alloc.num_used,
            len(sched.waiting),
            prompt_logprobs or {},
        )

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        ids = [self.add(p, params) for p in prompts]
        done: dict[int, list[int]] = {}
        while self.scheduler.has_work():
            step = self.step()
            if step.failed:
                raise RuntimeError(f"requests failed: {step.failed}")
            for req in step.finished_requests:
                done[req.request_id] = req.output_ids
        return [done[i] for i in ids]
