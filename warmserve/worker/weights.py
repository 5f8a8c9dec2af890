"""Weights straight from safetensors into a pool slot, and tensors that are views of slots.

A tensor-parallel rank's slot holds only its shard: each sliced tensor is read as slices of
the checkpoint's tensor (never the whole of it) and written once into its place.

With `pack` (a rule: name, shape, dtype -> bool, e.g. `cpu_linear.packable`), each weight it
picks is written in the CPU kernel's packed layout (`engine.cpu_linear`): the same bytes,
permuted as they are copied, so the slot's size and every other tensor's place are unchanged.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from warmserve.engine import cpu_linear
from warmserve.engine.arch import LlamaShape
from warmserve.engine.tp import TPShard
from warmserve.hardware import pages_for
from warmserve.worker.layout import TensorPlace, sharded_layout, weights_layout
from warmserve.worker.pool import PagePool, Slot

PackRule = Callable[[str, tuple[int, ...], torch.dtype], bool]


class LoadCancelled(RuntimeError):
    pass


class _DeviceRange:
    """Device memory described by the CUDA array interface, which torch wraps without a copy."""

    def __init__(self, addr: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,), "typestr": "|u1", "data": (addr, False), "version": 3,
            "strides": None,
        }  # fmt: skip


def memory_view(addr: int, num_bytes: int, device: str = "cpu") -> torch.Tensor:
    """A uint8 tensor over `num_bytes` at `addr` on `device`: no copy, `data_ptr() == addr`."""
    if device == "cpu":
        buf = (ctypes.c_uint8 * num_bytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8, count=num_bytes)
    out = torch.as_tensor(_DeviceRange(addr, num_bytes), device=device)
    assert out.data_ptr() == addr, "torch copied device memory it should have wrapped"
    return out


def slot_view(pool: PagePool, slot: Slot, num_bytes: int) -> torch.Tensor:
    """A uint8 tensor over the slot's virtual range, on the pool's device."""
    return memory_view(slot.addr, num_bytes, pool.backend.device)


def copy_into_slot(
    pool: PagePool,
    slot: Slot,
    layout: list[TensorPlace],
    num_pages: int,
    cancel: threading.Event | None = None,
    pack: PackRule | None = None,
) -> dict[str, torch.Tensor]:
    """Copy every tensor once into a slot already grown by `num_pages`; return views of it.

    Copying a tensor waits only until the pages under it are mapped, so loading overlaps the
    (queued) mapping of later pages. `cancel` is checked between tensors.
    """
    whole = slot_view(pool, slot, num_pages * pool.page_bytes)
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(t.file for t in layout):
        with safe_open(str(path), framework="pt") as f:
            for place in (t for t in layout if t.file == path):
                if cancel is not None and cancel.is_set():
                    raise LoadCancelled(place.name)
                pool.wait_mapped(slot, -(-(place.offset + place.nbytes) // pool.page_bytes))
                t = _read(f, place)
                raw = whole[place.offset : place.offset + place.nbytes]
                if pack is not None and pack(place.name, tuple(t.shape), t.dtype):
                    view = cpu_linear.packed_view(raw, tuple(t.shape))
                    cpu_linear.pack_into(view, t)
                else:
                    view = raw.view(t.dtype).view(t.shape)
                    view.copy_(t)
                pool.bytes_copied += place.nbytes  # the pool's only copying path
                out[place.name] = view
    return out


def _read(f, place: TensorPlace) -> torch.Tensor:
    """The tensor a place holds: the checkpoint's, or the concatenated slices of a shard."""
    if not place.pieces:
        return f.get_tensor(place.name)
    src = f.get_slice(place.name)
    lead = (slice(None),) * place.dim
    parts = [src[(*lead, slice(a, b))] for a, b in place.pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=place.dim)


def load_into_slot(
    pool: PagePool, slot: Slot, files: list[Path], pack: PackRule | None = None
) -> dict[str, torch.Tensor]:
    """Grow the slot by exactly the pages needed and copy the checkpoint into it."""
    layout, total = weights_layout(files)
    pages = max(1, pages_for(total, pool.page_bytes))
    pool.grow(slot, pages)
    return copy_into_slot(pool, slot, layout, pages, pack=pack)


def load_shard_into_slot(
    pool: PagePool,
    slot: Slot,
    files: list[Path],
    shard: TPShard,
    shape: LlamaShape,
    pack: PackRule | None = None,
) -> dict[str, torch.Tensor]:
    """Grow the slot by the pages one rank's shard needs and copy the shard into it; the
    views' shapes are those of `engine.tp.shard_shape(shape, shard)`."""
    layout, total = sharded_layout(files, shard, shape)
    pages = max(1, pages_for(total, pool.page_bytes))
    pool.grow(slot, pages)
    return copy_into_slot(pool, slot, layout, pages, pack=pack)
