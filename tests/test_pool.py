import ctypes

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse, PoolError

PAGE = 4096  # small pages keep the tests fast; the default is 2 MiB
N = 16


def read(addr: int) -> bytes:
    return bytes((ctypes.c_char * 8).from_address(addr))


def tag(addr: int, value: int) -> None:
    ctypes.memmove(addr, value.to_bytes(8, "little"), 8)


class PoolMachine(RuleBasedStateMachine):
    """Load, evict, activate, grow KV, lend, reclaim, free: books and mappings stay exact.

    Subclasses run it on other backends by overriding `make_backend`, `read` and `tag`."""

    page = PAGE

    def make_backend(self):
        return CpuPages(N, PAGE)

    def read(self, addr: int) -> bytes:
        return read(addr)

    def tag(self, addr: int, value: int) -> None:
        tag(addr, value)

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(self.make_backend(), asynchronous=False)
        self.tags: dict[int, int] = {}  # physical page -> the value written through a slot
        self.next_tag = 1

    def teardown(self) -> None:
        self.pool.close()

    def _write_new(self, slot, pages) -> None:
        for p in pages:
            i = slot.pages.index(p)
            self.tag(slot.addr + i * self.page, self.next_tag)
            self.tags[p] = self.next_tag
            self.next_tag += 1

    @rule(n=st.integers(1, 6), borrow=st.booleans())
    def load_weights(self, n, borrow):
        slot = self.pool.new_slot(PageUse.WEIGHTS)
        try:
            pages = self.pool.grow(slot, n, borrow=borrow)
        except PoolError:
            self.pool.free_slot(slot)
            return
        self._write_new(slot, pages)

    @rule(n=st.integers(1, 6))
    def start_kv(self, n):
        slot = self.pool.new_slot(PageUse.KV)
        try:
            self._write_new(slot, self.pool.grow(slot, n))
        except PoolError:
            self.pool.free_slot(slot)

    def _slots(self, kind):
        return [s for s in self.pool.slots.values() if s.kind == kind]

    @precondition(lambda self: self._slots(PageUse.WEIGHTS))
    @rule(k=st.integers(0, 100))
    def evict(self, k):
        ws = self._slots(PageUse.WEIGHTS)
        self.pool.free_slot(ws[k % len(ws)])

    @precondition(lambda self: self._slots(PageUse.KV) and self._slots(PageUse.WEIGHTS))
    @rule(k=st.integers(0, 100))
    def activate(self, k):
        """A weights slot's pages become another instance's KV: evict, then grow KV over them."""
        kv = self._slots(PageUse.KV)[k % len(self._slots(PageUse.KV))]
        victim = self._slots(PageUse.WEIGHTS)[k % len(self._slots(PageUse.WEIGHTS))]
        freed = [p for p in victim.pages if p not in self.pool.lender]
        before = self.pool.counts()[PageUse.FREE]
        self.pool.free_slot(victim)
        assert self.pool.counts()[PageUse.FREE] == before + len(freed)
        if freed:
            self._write_new(kv, self.pool.grow(kv, len(freed)))

    @precondition(lambda self: self._slots(PageUse.KV))
    @rule(k=st.integers(0, 100), n=st.integers(1, 4))
    def lend(self, k, n):
        kv = self._slots(PageUse.KV)[k % len(self._slots(PageUse.KV))]
        n = min(n, len(kv.pages))
        self.pool.lend(kv, n)

    @precondition(lambda self: self._slots(PageUse.KV))
    @rule(k=st.integers(0, 100), n=st.integers(1, 4))
    def reclaim(self, k, n):
        kv = self._slots(PageUse.KV)[k % len(self._slots(PageUse.KV))]
        available = sum(
            1
            for p, o in self.pool.lender.items()
            if o == kv.slot_id and self.pool.use[p] == PageUse.LENT
        )
        if n > available:
            with pytest.raises(PoolError):
                self.pool.reclaim(kv, n)
            for borrower in self.pool.borrowers(kv):  # evict what sits in lent pages
                self.pool.free_slot(borrower)
            return
        self.pool.reclaim(kv, n)

    @precondition(lambda self: self._slots(PageUse.KV))
    @rule(k=st.integers(0, 100))
    def stop_instance(self, k):
        self.pool.free_slot(self._slots(PageUse.KV)[k % len(self._slots(PageUse.KV))])

    @invariant()
    def books_balance_and_no_page_is_mapped_twice(self):
        self.pool.check()
        c = self.pool.counts()
        assert c[PageUse.FREE] + c[PageUse.WEIGHTS] + c[PageUse.KV] + c[PageUse.LENT] == N

    @invariant()
    def mappings_reach_the_right_physical_pages(self):
        # Whatever remapping happened, each slot still sees its pages' own contents: no copy.
        for s in self.pool.slots.values():
            for i, p in enumerate(s.pages):
                if p in self.tags:
                    got = self.read(s.addr + i * self.page)
                    assert got == self.tags[p].to_bytes(8, "little")


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_activation_remaps_evicted_weights_as_kv_without_copy():
    pool = PagePool(CpuPages(8, PAGE))
    a = pool.new_slot(PageUse.WEIGHTS)
    b = pool.new_slot(PageUse.WEIGHTS)
    pool.grow(a, 3)
    pool.grow(b, 4)
    pool.wait_mapped(b, 4, timeout_s=5)
    tag(b.addr + 2 * PAGE, 0xBEEF)
    b_pages = list(b.pages)
    # Activate a: b is evicted, a's KV slot grows over b's pages (the free one is taken first).
    kv = pool.new_slot(PageUse.KV)
    pool.free_slot(b)
    got = pool.grow(kv, 5)
    assert set(b_pages) <= set(got)
    pool.wait_mapped(kv, 5, timeout_s=5)
    i = kv.pages.index(b_pages[2])
    assert read(kv.addr + i * PAGE) == (0xBEEF).to_bytes(8, "little")  # same physical page
    pool.drain()
    pool.check()
    assert pool.counts() == {PageUse.FREE: 0, PageUse.WEIGHTS: 3, PageUse.KV: 5, PageUse.LENT: 0}
    pool.close()


def test_exhaustion_is_an_error_not_an_allocation():
    pool = PagePool(CpuPages(2, PAGE), asynchronous=False)
    s = pool.new_slot(PageUse.WEIGHTS)
    with pytest.raises(PoolError):
        pool.grow(s, 3)
    assert pool.counts()[PageUse.FREE] == 2
    pool.close()
