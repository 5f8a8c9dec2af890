"""KV-cache blocks: which block of the cache each sequence's tokens live in (no torch here).

Free blocks are handed out lowest id first, so used blocks gather at the low end and the
cache's tail stays free: that tail is what a worker lends to prewarming. `limit(n)` takes the
blocks from `n` up out of use (those still held leave when freed); `extend(n)` brings them back.
"""

from __future__ import annotations

import heapq


class BlockAllocator:
    """Fixed blocks of `block_size` tokens; check with `can_allocate` before `allocate`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks  # usable now: ids below this
        self.capacity = num_blocks  # the cache's size
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # a heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        assert self.can_allocate(num_blocks), "allocate without room: call can_allocate first"
        out = [heapq.heappop(self._free) for _ in range(num_blocks)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert b in self._used, f"block {b} freed twice or never allocated"
            self._used.remove(b)
            if b < self.num_blocks:
                heapq.heappush(self._free, b)

    # ----- shrinking and growing (KV lending) -------------------------------------------
    def limit(self, num_blocks: int) -> None:
        """Use only blocks below `num_blocks` from now on."""
        assert 0 < num_blocks <= self.num_blocks
        self.num_blocks = num_blocks
        self._free = [b for b in self._free if b < num_blocks]
        heapq.heapify(self._free)

    def held_above(self, num_blocks: int) -> int:
        """Blocks at or above `num_blocks` still held by sequences."""
        return sum(1 for b in self._used if b >= num_blocks)

    def extend(self, num_blocks: int) -> None:
        """Use blocks up to `num_blocks` again (at most the cache's size)."""
        assert self.num_blocks <= num_blocks <= self.capacity
        for b in range(self.num_blocks, num_blocks):
            if b not in self._used:
                heapq.heappush(self._free, b)
        self.num_blocks = num_blocks

    def check(self) -> None:
        assert not self._used.intersection(self._free)
        assert all(b < self.num_blocks for b in self._free)
        assert len(self._free) + sum(1 for b in self._used if b < self.num_blocks) == (
            self.num_blocks
        )
