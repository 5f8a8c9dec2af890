"""The engine loop: schedule → forward → sample → update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from warmserve.engine.llama import PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.request import Request, SamplingParams
from warmserve.engine.scheduler import Scheduler


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    # On the host: the request's generator is a CPU one, and one row is cheap to move.
    logits = logits.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(
        self,
        model: PagedLlama,
        cache: PagedKVCache,
        scheduler: Scheduler,
        eos_token_id: int | None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self._gens: dict[int, torch.Generator] = {}
        self._next_id = 0

    def add(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        rid = self._next_id
        self._next_id += 1
        self.scheduler.add(Request(rid, list(prompt_ids), params))
        if params.seed is not None:
            self._gens[rid] = torch.Generator().manual_seed(params.seed)
        return rid

    def abort(self, request_id: int) -> None:
        self.scheduler.abort(request_id)
        self._gens.pop(request_id, None)

    def step(self) -> list[Request]:
        """One engine step; the requests it finished."""
        return self.step_tokens()[1]

    def step_tokens(self) -> tuple[dict[int, int], list[Request]]:
        """One engine step: the token sampled for each request that sampled, and the requests
        it finished (a finished request's last token is among the sampled ones)."""
        out = self.scheduler.schedule()
        if not out.seqs:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with requests pending")
            return {}, []
        logits = self.model.forward(
            [SeqInput(s.token_ids, s.start, s.block_table) for s in out.seqs], self.cache
        )
        greedy = logits.argmax(-1).tolist()  # one call for all greedy rows
        sampled = {}
        for i, (row, seq) in enumerate(zip(logits, out.seqs, strict=True)):
            if seq.samples:
                req = self.scheduler.requests[seq.request_id]
                gen = self._gens.get(req.request_id)
                tok = greedy[i] if req.params.temperature == 0 else sample(row, req.params, gen)
                sampled[seq.request_id] = tok
        finished = self.scheduler.update(out, sampled, self.eos_token_id)
        for req in finished:
            self._gens.pop(req.request_id, None)
        return sampled, finished

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        ids = [self.add(p, params) for p in prompts]
        done: dict[int, list[int]] = {}
        while self.scheduler.has_work():
            for req in self.step():
                done[req.request_id] = req.output_ids
        return [done[i] for i in ids]
