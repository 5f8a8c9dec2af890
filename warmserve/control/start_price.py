"""The price of leaving a model short, for fair starts (`fair_starts.py`): stopping a model's
last instance (or one its load needs) costs the requests it then misses; starting the waiting
model saves some of its own. Both are counted the same way, from what a server knows (arrival
rates, loads, who is waiting; no output lengths): docs/fair-starts.md, "Round 3: pricing by the
wait behind the line" and "Round 5" (`starve_return_s`).

A mixin of `Controller` (through `FairStarts`), whose state it reads; split out only to keep
each module about one thing.
"""

from __future__ import annotations

from warmserve.types import ModelName


class StartPrice:
    """Methods of `Controller`, which holds the state they read: `cfg`, `_queues`, `_reserved`,
    `_arrivals`, `_first_arrival_s` and `load`."""

    def _note_arrival(self, name: ModelName, now: float) -> None:
        if self._first_arrival_s is None:
            self._first_arrival_s = now
        self._arrivals[name].append(now)
        self._forget_arrivals(name, now)  # a long-running server keeps one window, no more

    def _forget_arrivals(self, name: ModelName, now: float) -> None:
        q = self._arrivals[name]
        cutoff = now - self.cfg.starve_rate_window_s
        while q and q[0] <= cutoff:
            q.popleft()

    def arrival_rate(self, name: ModelName, now: float) -> float:
        """Requests per second of `name` over the last starve_rate_window_s (over the time
        since the first request of any model, if shorter, but at least scale_window_s)."""
        self._forget_arrivals(name, now)
        q, window = self._arrivals[name], self.cfg.starve_rate_window_s
        if self._first_arrival_s is None:
            return 0.0
        return len(q) / min(window, max(now - self._first_arrival_s, self.cfg.scale_window_s))

    def _in_line(self, now: float) -> set[ModelName]:
        """Models waiting for room: their oldest request has waited starve_wait_s and no block
        is held for them yet."""
        wait = self.cfg.starve_wait_s
        return {
            m
            for m, q in self._queues.items()
            if q and m not in self._reserved and now - q[0].arrival_s >= wait
        }

    def _missed_in_line(self, name: ModelName, now: float, line: set[ModelName]) -> float:
        """Requests `name` would miss if it had to wait for room behind the other models in
        `line`: one starve_preempt_gap_s each (at most one preemption starts per gap), at its
        arrival rate. With nobody else waiting, none: room comes back within a drain."""
        ahead = len(line - {name})
        return (
            self.arrival_rate(name, now) * self.cfg.starve_preempt_gap_s * ahead if ahead else 0.0
        )

    def _idle_stop_cost(self, name: ModelName, now: float, line: set[ModelName]) -> float:
        """Requests `name` misses once its idle last instance stops: those behind the other
        models in `line`, and (with starve_return_s) those arriving while it waits to come
        back, which in a full cluster takes a hold and a drain: stopping the idle instance of
        a model whose next request comes in seconds only moves the wait to that request."""
        cost = self._missed_in_line(name, now, line)
        if self.cfg.starve_return_s:
            # One arrival less than counted: a single request is no rate (a fresh server's
            # first request would otherwise read as a busy model and keep its instance).
            n = len(self._arrivals[name])
            if n > 1:
                cost += self.arrival_rate(name, now) * (n - 1) / n * self.cfg.starve_return_s
        return cost

    def _start_value(self, name: ModelName, now: float) -> float:
        """What starting the waiting model `name` saves: its load (its queued requests count)
        and the requests it would miss waiting behind the others in line if refused."""
        return self.load(name, now) + self._missed_in_line(name, now, self._in_line(now))
