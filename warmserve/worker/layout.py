"""Where each tensor of a safetensors checkpoint lands in a weights slot; torch-free.

Read from the files' JSON headers only, so the serving runtime can book a model's pages
before any worker loads it, and the worker lays the slot out the same way. A rank of a
tensor-parallel group holds only its shard (`sharded_layout`, cut as `engine.tp` says): the
same order and alignment, each sliced tensor with its shard's shape.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from warmserve.engine.arch import LlamaShape, read_config
from warmserve.engine.tp import TPShard, shard_shape, shard_slicing, sliced_shape
from warmserve.hardware import pages_for

ALIGN = 256  # tensor offsets inside a slot, for any element size
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}  # fmt: skip


# Within a layer, each group lands back to back and in this order, so the engine can run Q/K/V
# (and gate/up) as one matmul over a view spanning them (`engine.llama.adjacent_view`).
_FUSED_GROUPS = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
)


def _slot_order(name: str) -> tuple[str, int, int]:
    """(layer prefix, fused group, place in it); other tensors sort by name after them."""
    for g, group in enumerate(_FUSED_GROUPS):
        for i, suffix in enumerate(group):
            if name.endswith("." + suffix):
                return name[: -len(suffix)], g, i
    return name, len(_FUSED_GROUPS), 0


@dataclass(frozen=True, slots=True)
class TensorPlace:
    file: Path
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # in the slot
    nbytes: int
    # A tensor-parallel shard: the ranges of dimension `dim` of the checkpoint's tensor this
    # place holds, concatenated; empty: the whole tensor.
    dim: int = 0
    pieces: tuple[tuple[int, int], ...] = ()


def read_header(path: Path) -> dict[str, dict]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def weights_layout(
    files: list[Path], shard: TPShard | None = None, shape: LlamaShape | None = None
) -> tuple[list[TensorPlace], int]:
    """Every tensor's place and the bytes the slot needs. Files are laid out one after another;
    within a file, tensors are ordered by name, a layer's fusable projections side by side.
    With a shard (and the model's shape), the places of that rank's tensors."""
    if shard is not None and shape is None:
        raise ValueError("a shard's layout needs the model's shape")
    out: list[TensorPlace] = []
    offset = end = 0
    for path in files:
        header = read_header(path)
        prev: tuple[str, int, str] | None = None
        for (prefix, group, _), name in sorted((_slot_order(n), n) for n in header):
            info = header[name]
            dtype = info["dtype"]
            fused = (prefix, group, dtype) if group < len(_FUSED_GROUPS) else None
            if fused is not None and fused == prev:
                offset = end  # the next member of a fused group: no padding in between
            prev = fused
            if dtype not in _ITEM_BYTES:
                raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
            dims = tuple(int(d) for d in info["shape"])
            slicing = None
            if shard is not None and shape is not None:
                slicing = shard_slicing(shape, shard, name)
                dims = sliced_shape(dims, slicing)
            numel = 1
            for d in dims:
                numel *= d
            nbytes = numel * _ITEM_BYTES[dtype]
            dim, pieces = slicing if slicing is not None else (0, ())
            out.append(TensorPlace(path, name, dtype, dims, offset, nbytes, dim, pieces))
            end = offset + nbytes
            offset = -(-end // ALIGN) * ALIGN
    return out, offset


def checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def weight_pages(model_dir: Path, page_bytes: int) -> int:
    """Pages a model's weights take in a slot."""
    _, total = weights_layout(checkpoint_files(model_dir))
    return max(1, pages_for(total, page_bytes))


def sharded_layout(
    files: list[Path], shard: TPShard, shape: LlamaShape
) -> tuple[list[TensorPlace], int]:
    """The places of one rank's shard and the bytes its slot needs; `UnsupportedModel` where
    the model cannot be split so."""
    shard_shape(shape, shard)  # refuses what tensor parallelism does not run
    return weights_layout(files, shard, shape)


def shard_weight_pages(model_dir: Path, page_bytes: int, shard: TPShard) -> int:
    """Pages one rank's shard of a model's weights takes in its slot."""
    shape = LlamaShape.from_hf_config(read_config(model_dir), model_dir.name)
    _, total = sharded_layout(checkpoint_files(model_dir), shard, shape)
    return max(1, pages_for(total, page_bytes))
