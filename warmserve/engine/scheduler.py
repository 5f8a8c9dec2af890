"""Continuous batching (no torch): which sequences run this step, with which new tokens.

There is no prefill or decode phase: each step gives every running request one token (decode)
and fills the rest of the token budget with waiting prompts, in chunks if needed. When the KV
blocks run out, the most recently admitted running request is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.request import FinishReason, Request


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    request_id: int
    token_ids: tuple[int, ...]  # the new tokens whose KV this step computes
    start: int  # position of the first of them
    block_table: tuple[int, ...]
    samples: bool  # True when this chunk reaches the end: a token is sampled after it


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[int, ...]


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, max_batched_tokens: int = 2048, max_seqs: int = 64
    ) -> None:
        self.alloc = allocator
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}

    def add(self, req: Request) -> None:
        need = self.alloc.blocks_for(len(req.prompt_ids) + req.params.max_tokens)
        if need > self.alloc.num_blocks:
            raise ValueError(f"request {req.request_id} needs {need} blocks, the cache has "
                             f"{self.alloc.num_blocks}")  # fmt: skip
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: int) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.finish_reason = FinishReason.ABORT
        return req

    def _release(self, req: Request) -> None:
        self.alloc.free(req.block_table)
        req.block_table = []
        req.num_computed = 0

    def _requeue(self, req: Request) -> None:
        """Back to the front of the queue, but behind a prompt that is mid-way through its
        chunks: that one holds blocks, and must stay first so it can always finish."""
        if self.waiting and self.waiting[0].block_table:
            self.waiting.insert(1, req)
        else:
            self.waiting.appendleft(req)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        extra = self.alloc.blocks_for(num_tokens) - len(req.block_table)
        if extra <= 0:
            return True
        if not self.alloc.can_allocate(extra):
            return False
        req.block_table += self.alloc.allocate(extra)
        return True

    def schedule(self) -> SchedulerOutput:
        seqs: list[ScheduledSeq] = []
        preempted: list[int] = []
        budget = self.max_batched_tokens
        # Decode: one token for every running request, preempting from the back if short.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            while not self._grow(req, req.num_tokens):
                victim = self.running.pop()
                self._release(victim)
                self._requeue(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                last = req.num_tokens - 1
                seqs.append(ScheduledSeq(req.request_id, (req.all_ids[last],), last,
                                         tuple(req.block_table), True))  # fmt: skip
                budget -= 1
                i += 1
                continue
            # req itself was preempted; the loop index now points past the end or at the next
        # Prefill: waiting prompts (or recomputation), FCFS, in chunks within the budget.
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed
            chunk = min(remaining, budget)
            if not self._grow(req, req.num_computed + chunk):
                break
            self.waiting.popleft()
            self.running.append(req)
            ids = tuple(req.all_ids[req.num_computed : req.num_computed + chunk])
            seqs.append(ScheduledSeq(req.request_id, ids, req.num_computed,
                                     tuple(req.block_table), chunk == remaining))  # fmt: skip
            budget -= chunk
        return SchedulerOutput(tuple(seqs), tuple(preempted))

    def update(
        self, out: SchedulerOutput, sampled: dict[int, int], eos_token_id: int | None
    ) -> list[Request]:
        """Record the step's computed KV and sampled tokens; return the requests that finished."""
        finished = []
        for seq in out.seqs:
            req = self.requests[seq.request_id]
            req.num_computed = seq.start + len(seq.token_ids)
            if not seq.samples:
                self.running.remove(req)  # a chunked prompt goes back to wait for its next chunk
                self.waiting.appendleft(req)
                continue
            tok = sampled[seq.request_id]
            req.output_ids.append(tok)
            p = req.params
            if tok in p.stop_token_ids or (tok == eos_token_id and not p.ignore_eos):
                req.finish_reason = FinishReason.STOP
            elif len(req.output_ids) >= p.max_tokens:
                req.finish_reason = FinishReason.LENGTH
            if req.finish_reason is not None:
                self.running.remove(req)
                self._release(req)
                del self.requests[req.request_id]
                finished.append(req)
        return finished
