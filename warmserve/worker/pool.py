"""A worker's device memory as a pool of fixed-size pages, mapped into virtual slots.

Every page is in exactly one use: FREE, WEIGHTS (mapped in a weights slot), KV (mapped in a KV
slot) or LENT (given up by a KV slot for prewarming, mapped nowhere). A weights slot may borrow
LENT pages; they count as WEIGHTS while borrowed and go back to their lender, not to FREE, when
that slot is freed. Pages are created once; nothing is allocated at run time.

Map and unmap calls run in submission order on one queue (a single worker thread), while the
books change at once. That order is what makes "free now, unmap later" safe: a page's next map
is always queued behind its unmap. Loading can overlap mapping: `wait_mapped` blocks until the
first n pages of a slot are mapped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum

from warmserve.worker.pages import PageBackend


class PageUse(IntEnum):
    FREE = 0
    WEIGHTS = 1
    KV = 2
    LENT = 3


class PoolError(RuntimeError):
    pass


@dataclass(slots=True)
class Slot:
    slot_id: int
    kind: PageUse  # WEIGHTS or KV
    addr: int
    pages: list[int] = field(default_factory=list)  # in virtual order
    mapped: int = 0  # pages whose map call has completed
    cond: threading.Condition = field(default_factory=threading.Condition)


class PagePool:
    def __init__(self, backend: PageBackend, *, asynchronous: bool = True) -> None:
        self.backend = backend
        self.page_bytes = backend.page_bytes
        self.num_pages = backend.num_pages
        self.use = [PageUse.FREE] * self.num_pages
        self.lender: dict[int, int] = {}  # LENT or borrowed page -> KV slot it belongs to
        self.slots: dict[int, Slot] = {}
        self._next_slot = 0
        self._queue = ThreadPoolExecutor(1, "pool-map") if asynchronous else None
        self._last: Future[None] | None = None
        self.bytes_copied = 0  # bytes written by weight loads (activation must add none)

    # ----- books ------------------------------------------------------------------------
    def counts(self) -> dict[PageUse, int]:
        out = dict.fromkeys(PageUse, 0)
        for u in self.use:
            out[u] += 1
        return out

    def _take(self, n: int, uses: tuple[PageUse, ...], lender: int | None = None) -> list[int]:
        pages = [
            p
            for p, u in enumerate(self.use)
            if u in uses and (lender is None or self.lender.get(p) == lender)
        ][:n]
        if len(pages) < n:
            raise PoolError(f"need {n} pages, {len(pages)} available")
        return pages

    # ----- slots ------------------------------------------------------------------------
    def new_slot(self, kind: PageUse) -> Slot:
        assert kind in (PageUse.WEIGHTS, PageUse.KV)
        addr = self.backend.reserve(self.num_pages * self.page_bytes)
        slot = Slot(self._next_slot, kind, addr)
        self._next_slot += 1
        self.slots[slot.slot_id] = slot
        return slot

    def grow(self, slot: Slot, n: int, *, borrow: bool = False) -> list[int]:
        """Map n more pages at the slot's end: free pages, or (weights, `borrow`) lent ones."""
        uses = (
            (PageUse.FREE, PageUse.LENT)
            if borrow and slot.kind == PageUse.WEIGHTS
            else (PageUse.FREE,)
        )
        pages = self._take(n, uses)
        for p in pages:
            self.use[p] = slot.kind
            self._map(slot, len(slot.pages), p)
            slot.pages.append(p)
        return pages

    def free_slot(self, slot: Slot) -> None:
        """Unmap and return every page (borrowed ones to their lender); release the range."""
        lent_by_me = [p for p, owner in self.lender.items() if owner == slot.slot_id]
        for p in lent_by_me:  # a KV slot going away: what it lent is free (or plain weights)
            del self.lender[p]
            if self.use[p] == PageUse.LENT:
                self.use[p] = PageUse.FREE
        for i, p in enumerate(slot.pages):
            self.use[p] = PageUse.LENT if p in self.lender else PageUse.FREE
            self._unmap(slot, i)
        slot.pages = []
        del self.slots[slot.slot_id]
        self._submit(lambda: self.backend.release(slot.addr, self.num_pages * self.page_bytes))

    # ----- KV lending -------------------------------------------------------------------
    def lend(self, kv: Slot, n: int) -> list[int]:
        """Unmap the last n pages of a KV slot and make them available to prewarming."""
        assert kv.kind == PageUse.KV and n <= len(kv.pages)
        pages = []
        for _ in range(n):
            i = len(kv.pages) - 1
            p = kv.pages.pop()
            self._unmap(kv, i)
            self.use[p] = PageUse.LENT
            self.lender[p] = kv.slot_id
            pages.append(p)
        return pages

    def reclaim(self, kv: Slot, n: int) -> list[int]:
        """Map n of the KV slot's lent pages back at its end; raises if they are borrowed."""
        pages = self._take(n, (PageUse.LENT,), lender=kv.slot_id)
        for p in pages:
            del self.lender[p]
            self.use[p] = PageUse.KV
            self._map(kv, len(kv.pages), p)
            kv.pages.append(p)
        return pages

    def borrowers(self, kv: Slot) -> list[Slot]:
        """Weights slots holding pages this KV slot lent (to evict before reclaiming them)."""
        mine = {p for p, owner in self.lender.items() if owner == kv.slot_id}
        return [s for s in self.slots.values() if s.kind == PageUse.WEIGHTS and mine & set(s.pages)]

    # ----- ordered mapping --------------------------------------------------------------
    def _submit(self, fn: Callable[[], None]) -> None:
        if self._queue is None:
            fn()
        else:
            self._last = self._queue.submit(fn)

    def _map(self, slot: Slot, index: int, page: int) -> None:
        addr = slot.addr + index * self.page_bytes

        def run() -> None:
            self.backend.map_page(addr, page)
            with slot.cond:
                slot.mapped += 1
                slot.cond.notify_all()

        self._submit(run)

    def _unmap(self, slot: Slot, index: int) -> None:
        addr = slot.addr + index * self.page_bytes

        def run() -> None:
            self.backend.unmap_page(addr)
            with slot.cond:
                slot.mapped -= 1

        self._submit(run)

    def wait_mapped(self, slot: Slot, num_pages: int, timeout_s: float | None = None) -> None:
        with slot.cond:
            if not slot.cond.wait_for(lambda: slot.mapped >= num_pages, timeout_s):
                raise TimeoutError(f"slot {slot.slot_id}: {slot.mapped}/{num_pages} pages mapped")

    def drain(self) -> None:
        """Wait for every queued map and unmap."""
        if self._last is not None:
            self._last.result()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.shutdown(wait=True)
        self.backend.close()

    # ----- invariants -------------------------------------------------------------------
    def check(self) -> None:
        counts = self.counts()
        assert sum(counts.values()) == self.num_pages
        seen: dict[int, int] = {}
        for s in self.slots.values():
            for p in s.pages:
                assert p not in seen, f"page {p} mapped in slots {seen[p]} and {s.slot_id}"
                seen[p] = s.slot_id
                assert self.use[p] == s.kind, (
                    f"page {p} in a {s.kind.name} slot is {self.use[p].name}"
                )
        for p, u in enumerate(self.use):
            if u in (PageUse.FREE, PageUse.LENT):
                assert p not in seen, f"{u.name} page {p} is mapped in slot {seen[p]}"
            if u == PageUse.LENT:
                assert self.lender.get(p) in self.slots, f"lent page {p} has no lender"
            if u == PageUse.FREE:
                assert p not in self.lender
