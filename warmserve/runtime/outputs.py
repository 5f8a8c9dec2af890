"""The one place a request's outputs go: token batches become stream items and metrics, and
every way a request ends (a finish, a stop string, the client leaving, a failure) closes it
exactly once and tells the runtime, which releases it in the control plane and the worker.
No torch, no HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from warmserve.clock import Clock
from warmserve.runtime import messages as m
from warmserve.runtime.metrics import ServeMetrics
from warmserve.runtime.requests import RuntimeRequest, StreamError, TokenDelta


class OutputProcessor:
    def __init__(
        self,
        metrics: ServeMetrics,
        clock: Clock,
        on_end: Callable[[RuntimeRequest, bool], None],
    ) -> None:
        """`on_end(request, abort_on_worker)`: the request is closed; release it in the
        control plane (and, with `abort_on_worker`, stop it on its worker)."""
        self.metrics = metrics
        self.clock = clock
        self.requests: dict[int, RuntimeRequest] = {}
        self._on_end = on_end
        self._all_done = asyncio.Event()
        self._all_done.set()

    def add(self, req: RuntimeRequest) -> None:
        self.requests[req.request_id] = req
        self._all_done.clear()
        self.metrics.prompt_tokens.labels(req.model).inc(len(req.prompt_ids))

    async def wait_all_done(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._all_done.wait(), timeout_s)

    def tokens(self, batch: m.TokenBatch) -> None:
        now = self.clock.now()
        for item in batch.items:
            req = self.requests.get(item.request_id)
            if req is None or req.done:
                continue  # aborted: the worker had already sampled this step
            if req.first_token_s is None:
                req.first_token_s = now
                self.metrics.ttft.labels(req.model).observe(now - req.arrival_s)
            n = len(item.token_ids)
            req.generated += n
            self.metrics.generation_tokens.labels(req.model).inc(n)
            req.queue.put_nowait(
                TokenDelta(item.token_ids, item.finish_reason, item.logprobs, item.prompt_logprobs)
            )
            if item.finish_reason is not None:
                self.finish(req, item.finish_reason, abort_on_worker=False)

    def finish(self, req: RuntimeRequest, reason: str, abort_on_worker: bool) -> None:
        """Ended with `reason` ("stop", "length"; "abort" counts no success)."""
        now = self.clock.now()
        self._close(req)
        if reason != "abort":
            self.metrics.request_success.labels(req.model, reason).inc()
            self.metrics.e2e.labels(req.model).observe(now - req.arrival_s)
            if req.generated > 1 and req.first_token_s is not None:
                tpot = (now - req.first_token_s) / (req.generated - 1)
                self.metrics.tpot.labels(req.model).observe(tpot)
        self._on_end(req, abort_on_worker)

    def abort(self, req: RuntimeRequest, reason: str) -> None:
        """The client went away (`client`) or a stop string matched (`stop`, a success)."""
        if reason == "client":
            self.metrics.request_aborted.labels(req.model).inc()
        self.finish(req, "stop" if reason == "stop" else "abort", abort_on_worker=True)

    def fail(self, req: RuntimeRequest, err: StreamError, reason: str) -> None:
        req.queue.put_nowait(err)
        self.metrics.request_failure.labels(req.model, reason).inc()
        self.finish(req, "abort", abort_on_worker=True)

    def _close(self, req: RuntimeRequest) -> None:
        req.done = True
        self.requests.pop(req.request_id, None)
        if not self.requests:
            self._all_done.set()
