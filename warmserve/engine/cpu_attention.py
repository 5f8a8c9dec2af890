"""Decode attention that reads the paged KV cache in place, fp32 on a CPU
(`data/kernels/attention_f32.c`).

The torch path gathers every decoding sequence's blocks into one tensor per layer, a copy of
the whole context each layer each step, before `scaled_dot_product_attention`; at 32
concurrent SmolLM2 sequences that gather took about as long as the attention. The kernel
reads each key and value in its block, once per KV head for the query heads that share it.
Used for fp32 caches on a CPU with a head size that is a multiple of 16 where the kernel
builds (`engine.kernels`); elsewhere the engine keeps the torch path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from warmserve.engine import kernels

__all__ = ["available", "decode_attention", "supports"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    # Never -ffast-math: linking it into a shared library sets flush-to-zero for the whole
    # process at load (gcc's crtfastmath), which changed unrelated float checks.
    lib = kernels.load("attention_f32", ("-O3", "-march=native", "-fno-math-errno"), ("-lm",))
    if lib is None:
        return None
    fn = lib.ws_paged_decode_attention_f32
    fn.restype = None
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    return lib


def available() -> bool:
    return _library() is not None


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and head_dim % 16 == 0 and available()


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    lo: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence, `[B, heads, head_dim]`.

    `k`, `v`: one layer's cache, `[blocks, block_size, kv_heads, head_dim]` views (blocks may
    be strided apart, rows within a block contiguous); `tables`: `[B, width]` block ids
    (int64); `lens`: keys per sequence, the query's own included; `lo`: the first key each
    query sees (a sliding window), 0 for all."""
    lib = _library()
    assert lib is not None, "the attention kernel is unavailable: check supports() first"
    b, h, d = q.shape
    _, bs, kvh, _ = k.shape
    assert k.stride()[1:] == (kvh * d, d, 1) and v.stride() == k.stride()
    assert q.dtype == k.dtype == torch.float32 and h % kvh == 0
    q = q.contiguous()
    tables, lens, lo = tables.contiguous(), lens.contiguous(), lo.contiguous()
    width = tables.shape[1]
    scratch = torch.empty(h // kvh, width * bs, dtype=torch.float32)
    out = torch.empty(b, h, d, dtype=torch.float32)
    lib.ws_paged_decode_attention_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0),
        tables.data_ptr(), width, lens.data_ptr(), lo.data_ptr(),
        b, h, kvh, d, bs, scale, scratch.data_ptr(), width * bs, out.data_ptr(),
    )  # fmt: skip
    return out
