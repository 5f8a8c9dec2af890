"""KV-cache blocks: which block of the cache each sequence's tokens live in (no torch here)."""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    """Fixed blocks of `block_size` tokens; check with `can_allocate` before `allocate`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        assert self.can_allocate(num_blocks), "allocate without room: call can_allocate first"
        out = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert b in self._used, f"block {b} freed twice or never allocated"
            self._used.remove(b)
            self._free.append(b)

    def check(self) -> None:
        assert len(self._free) + len(self._used) == self.num_blocks
        assert not self._used.intersection(self._free)
