"""Physical pages and virtual ranges: the CPU analogue of CUDA's VMM calls.

`cuMemCreate` ↔ pages of one `memfd` (allocated up front with `fallocate`);
`cuMemAddressReserve` ↔ an anonymous `PROT_NONE` mapping; `cuMemMap` ↔ `mmap(MAP_FIXED |
MAP_SHARED)` of one page of the memfd at an offset of the range; `cuMemUnmap` ↔ mapping the
hole back to `PROT_NONE`. Writes through a range land in the memfd's pages, so remapping a page
into another range moves its contents without a copy. `cuda_pages.CudaPages` is the GPU backend.
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

_PROT_NONE, _PROT_RW = 0x0, 0x1 | 0x2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANON, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


class PageBackend(Protocol):
    page_bytes: int
    num_pages: int
    device: str  # where the pages live, as torch names it: "cpu", "cuda:0"

    def reserve(self, num_bytes: int) -> int: ...

    def release(self, addr: int, num_bytes: int) -> None: ...

    def map_page(self, addr: int, page: int) -> None: ...

    def unmap_page(self, addr: int) -> None: ...

    def close(self) -> None: ...


class CpuPages:
    """`num_pages` pages of `page_bytes` in one memfd, pre-faulted at creation."""

    def __init__(self, num_pages: int, page_bytes: int = 2 << 20) -> None:
        if num_pages < 1 or page_bytes % os.sysconf("SC_PAGE_SIZE"):
            raise ValueError("need >= 1 page of a multiple of the OS page size")
        self.page_bytes = page_bytes
        self.num_pages = num_pages
        self.device = "cpu"
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mmap.restype = ctypes.c_void_p
        self._libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_long]  # fmt: skip
        self._libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._fd = os.memfd_create("warmserve-pool", os.MFD_CLOEXEC)
        os.posix_fallocate(self._fd, 0, num_pages * page_bytes)  # pre-fault: no faults later

    def _mmap(self, addr: int | None, size: int, prot: int, flags: int, offset: int = 0) -> int:
        fd = self._fd if flags & _MAP_SHARED else -1
        out = self._libc.mmap(addr, size, prot, flags, fd, offset)
        if out is None or out == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}")
        return int(out)

    def reserve(self, num_bytes: int) -> int:
        return self._mmap(None, num_bytes, _PROT_NONE, _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE)

    def release(self, addr: int, num_bytes: int) -> None:
        if self._libc.munmap(addr, num_bytes) != 0:
            raise OSError(ctypes.get_errno(), "munmap failed")

    def map_page(self, addr: int, page: int) -> None:
        assert 0 <= page < self.num_pages
        self._mmap(
            addr, self.page_bytes, _PROT_RW, _MAP_SHARED | _MAP_FIXED, page * self.page_bytes
        )

    def unmap_page(self, addr: int) -> None:
        flags = _MAP_PRIVATE | _MAP_ANON | _MAP_FIXED | _MAP_NORESERVE
        self._mmap(addr, self.page_bytes, _PROT_NONE, flags)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
