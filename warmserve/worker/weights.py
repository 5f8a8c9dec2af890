"""Weights straight from safetensors into a pool slot, and tensors that are views of slots."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from safetensors import safe_open

from warmserve.worker.pool import PagePool, Slot

ALIGN = 256  # tensor offsets inside a slot, for any element size


def slot_view(slot: Slot, num_bytes: int) -> torch.Tensor:
    """A uint8 tensor over the slot's virtual range: no copy, `data_ptr() == slot.addr`."""
    buf = (ctypes.c_uint8 * num_bytes).from_address(slot.addr)
    return torch.frombuffer(buf, dtype=torch.uint8, count=num_bytes)


def load_into_slot(pool: PagePool, slot: Slot, files: list[Path]) -> dict[str, torch.Tensor]:
    """Copy every tensor of the safetensors files into the slot once; return views of it.

    The slot grows by exactly the pages needed; copying a tensor waits only until the pages
    under it are mapped, so loading overlaps the (queued) mapping of later pages.
    """
    layout: list[tuple[Path, str, int, int]] = []  # file, name, offset, bytes
    offset = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                nbytes = numel * torch.empty((), dtype=_dtype(sl.get_dtype())).element_size()
                layout.append((path, name, offset, nbytes))
                offset = -(-(offset + nbytes) // ALIGN) * ALIGN
    pages = max(1, -(-offset // pool.page_bytes))
    pool.grow(slot, pages)
    whole = slot_view(slot, pages * pool.page_bytes)
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(p for p, _, _, _ in layout):
        with safe_open(str(path), framework="pt") as f:
            for _, name, off, nbytes in (x for x in layout if x[0] == path):
                pool.wait_mapped(slot, -(-(off + nbytes) // pool.page_bytes))
                t = f.get_tensor(name)
                view = whole[off : off + nbytes].view(t.dtype).view(t.shape)
                view.copy_(t)
                pool.bytes_copied += nbytes  # the pool's only copying path: loading weights
                out[name] = view
    return out


def _dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32}  # fmt: skip
    return table[name]
