"""Linear layers over weights stored packed for the CPU: the layout a worker's slot holds.

A decode step multiplies a few rows by every weight matrix, and there the CPU BLAS on a
plain `[out, in]` weight reaches a fraction of the machine's read bandwidth (it packs panels
of the weight on every call). Packed `[out / 32, in, 32]` (`data/kernels/linear_f32.c`), a
tile of 32 outputs streams in address order while up to 12 rows accumulate in registers.
Packing is a permutation of the same bytes, so a worker packs each projection once while
prewarming, straight from the checkpoint into its slot: activation still copies nothing and
the weights take no more memory. `benchmarks/engine_throughput.py` measures what it buys.

The kernel is compiled for the host on first use (`engine.kernels`). Packing is used only
for fp32 on a CPU and where the worker runs one torch thread (the kernel is single-threaded;
with more threads the BLAS's own threading wins), and never where the kernel cannot be built:
then weights keep the plain layout and `F.linear`. `WARMSERVE_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from warmserve.engine import kernels

__all__ = [
    "TILE",
    "available",
    "is_packed",
    "linear",
    "logical_shape",
    "pack_into",
    "packable",
    "packed_view",
    "rows",
    "unpack",
    "use_packing",
]

TILE = 32  # outputs per packed tile; the C source's TW


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = kernels.load("linear_f32", ("-O3", "-march=native"))
    if lib is None or lib.ws_tile_width() != TILE:
        return None
    fn = lib.ws_linear_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    return lib


def available() -> bool:
    """The kernel is built (or buildable) on this host."""
    return _library() is not None


def use_packing(device: str | torch.device = "cpu", want: bool | None = None) -> bool:
    """Whether a worker on `device` packs its weights: only on a CPU with the kernel built,
    and there as `want` says (None: where it runs one torch thread)."""
    if torch.device(device).type != "cpu" or want is False:
        return False
    return (want or torch.get_num_threads() == 1) and available()


def packable(name: str, shape: tuple[int, ...], dtype: torch.dtype, tied: bool = False) -> bool:
    """A weight the kernel can run (fp32, 2-D, whole tiles) and that only multiplies: a
    decoder layer's projection, the LM head, and the embedding where it is the LM head
    (`tied`; its lookups then gather rows from the packed layout, `rows`)."""
    if dtype != torch.float32 or len(shape) != 2 or shape[0] == 0 or shape[0] % TILE:
        return False
    if name.startswith("model.layers.") and name.endswith("_proj.weight"):
        return True
    return name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")


def packed_view(buf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The packed `[out / 32, in, 32]` fp32 view of `buf`'s bytes for a `shape` weight."""
    n, k = shape
    return buf.view(torch.float32).view(n // TILE, k, TILE)


def pack_into(dst: torch.Tensor, w: torch.Tensor) -> None:
    """Write weight `w` (`[out, in]`) packed into `dst` (a `packed_view`): one strided copy,
    no temporary."""
    n, k = w.shape
    dst.copy_(w.reshape(n // TILE, TILE, k).transpose(1, 2))


def is_packed(w: torch.Tensor) -> bool:
    return w.dim() == 3 and w.shape[-1] == TILE


def logical_shape(w: torch.Tensor) -> tuple[int, ...]:
    """The `[out, in]` shape a packed weight stands for (a plain one's own shape)."""
    if is_packed(w):
        return (w.shape[0] * TILE, w.shape[1])
    return tuple(w.shape)


def rows(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a plain or packed weight (an embedding lookup), `[len(ids), in]`."""
    if not is_packed(w):
        return w[ids]
    return w[ids // TILE, :, ids % TILE]


def unpack(w: torch.Tensor) -> torch.Tensor:
    """A plain `[out, in]` copy of a packed weight (checks and tests)."""
    t, k, _ = w.shape
    return w.transpose(1, 2).reshape(t * TILE, k)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` for a plain or a packed weight."""
    if not is_packed(w):
        return F.linear(x, w, bias)
    lib = _library()
    if lib is None:  # packed by a process that had the kernel; should not happen
        raise RuntimeError("packed weights need the CPU linear kernel, which is unavailable")
    n, k = w.shape[0] * TILE, w.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        lib.ws_linear_f32(x2.data_ptr(), m, k, w.data_ptr(), n,
                          None if bias is None else bias.data_ptr(), y.data_ptr())  # fmt: skip
    return y.view(*lead, n)
