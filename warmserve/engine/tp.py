"""Tensor parallelism: which part of a model each rank of a TP group holds; torch-free.

Attention is split by KV group: a rank owns whole KV heads together with all their query
heads, so its attention needs nothing from other ranks. Where the KV heads do not divide by
the TP size, ranks own unequal numbers of them, the first ranks one more (SmolLM2-135M has 9
query heads in 3 KV groups: at TP 2 rank 0 owns groups 0-1, rank 1 group 2). Where the TP size
exceeds the KV heads, each KV head is replicated on several ranks, as vLLM does, and its query
heads are split among them (as evenly as possible; every rank still owns exactly one KV head,
and at least one query head, so TP may be any size up to the number of query heads).
OLMo 2's q/k norms over the whole projection are sliced with it, and take one more, small sum
a layer (each rank's sums of squares; a replicated KV head's counted once: `full_norm`).

The MLP's intermediate dimension is split as evenly as possible into contiguous slices:
gate/up are column-parallel (a rank computes its slice of the activations), down is
row-parallel (a partial sum of the output). Q/K/V are column-parallel by heads, O row-parallel.
Each row-parallel output is summed over the group (an all-reduce after o_proj and after
down_proj); biases of column-parallel layers are sliced, those of row-parallel layers are
replicated and added once, after the sum. Embeddings, norms and the LM head are replicated:
simpler than a vocabulary-parallel head, and every rank then holds the same logits, so only
the leader samples and no gather is needed (the cost: each rank holds the embedding and head;
SmolLM2's tied 28 M of 135 M parameters).

The shapes here are what a rank's slot holds (`worker.layout.sharded_layout`), and the rank's
engine runs the model of `shard_shape`: the same decoder with fewer heads and a narrower MLP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from warmserve.engine.arch import LlamaShape, UnsupportedModel


@dataclass(frozen=True, slots=True)
class TPShard:
    """What rank `rank` of a TP group of `size` holds: whole KV heads `kv_heads` (replicated on
    other ranks when size > KV heads), query heads `q_heads` (contiguous, each attending to one
    of `kv_heads`), and the MLP's intermediate columns `ffn[0]:ffn[1]`."""

    rank: int
    size: int
    kv_heads: tuple[int, ...]
    q_heads: tuple[int, ...]
    ffn: tuple[int, int]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, slots=True)
class TPGroup:
    """A rank's place in a built TP group: its rank in it, the size, the torch.distributed
    process group (`group`, typed loosely to keep this module torch-free) and the global rank
    of the group's rank 0, the leader, which broadcasts each step. `engine.lockstep.tp_group`
    makes one for this process from a built process group."""

    rank: int
    size: int
    group: Any
    leader_global_rank: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def _part(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of `range(n)` split into `parts` contiguous parts, the first ones one longer."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (i < extra)


def shard_plan(shape: LlamaShape, size: int) -> tuple[TPShard, ...]:
    """Every rank's shard of `shape` at TP `size`, by rank. `UnsupportedModel` where a rank
    would own no query head or no MLP column."""
    nq, nkv = shape.num_heads, shape.num_kv_heads
    name = f"{shape.architecture} with {nq} query heads"
    if size < 1:
        raise ValueError(f"TP size must be >= 1, got {size}")
    if nq % nkv:
        raise UnsupportedModel(f"{name}: {nkv} KV heads do not divide them")
    if size > nq:
        raise UnsupportedModel(f"{name}: TP {size} exceeds the number of query heads")
    if size > shape.intermediate_size:
        raise UnsupportedModel(f"{name}: TP {size} exceeds the MLP's {shape.intermediate_size}")
    group = nq // nkv
    inter = shape.intermediate_size
    out: list[TPShard] = []
    if size <= nkv:  # whole KV groups per rank
        for r in range(size):
            a, b = _part(nkv, size, r)
            out.append(TPShard(r, size, tuple(range(a, b)), tuple(range(a * group, b * group)),
                               _part(inter, size, r)))  # fmt: skip
        return tuple(out)
    for h in range(nkv):  # KV head h replicated on ranks [lo, hi), its query heads split
        lo, hi = _part(size, nkv, h)
        for j in range(hi - lo):
            a, b = _part(group, hi - lo, j)
            r = lo + j
            out.append(TPShard(r, size, (h,), tuple(range(h * group + a, h * group + b)),
                               _part(inter, size, r)))  # fmt: skip
    return tuple(out)


def shard_shape(shape: LlamaShape, shard: TPShard) -> LlamaShape:
    """The model a rank runs: its heads and MLP columns, everything else as the full model.
    Its `expected_tensors` are the shard's tensors; its KV cache holds only the rank's heads."""
    if shard.size == 1:
        return shape
    full_norm = None
    if shape.variant.qk_norm == "full":  # OLMo 2: the norms need the whole projections' sums
        replicated = shard.size > shape.num_kv_heads
        first = _part(shard.size, shape.num_kv_heads, shard.kv_heads[0])[0]  # of its KV head
        d = shape.head_dim
        full_norm = (shape.num_heads * d, shape.num_kv_heads * d,
                     not replicated or shard.rank == first)  # fmt: skip
    return dataclasses.replace(
        shape,
        num_heads=len(shard.q_heads),
        num_kv_heads=len(shard.kv_heads),
        intermediate_size=shard.ffn[1] - shard.ffn[0],
        full_norm=full_norm,
    )


# A tensor's shard: the ranges of dimension `dim` it keeps, concatenated in order (several
# ranges only for checkpoints that store Q/K/V or gate/up as one tensor).
Slicing = tuple[int, tuple[tuple[int, int], ...]]


def shard_slicing(shape: LlamaShape, shard: TPShard, name: str) -> Slicing | None:
    """How the rank's copy of checkpoint tensor `name` is cut from it; None: replicated."""
    if shard.size == 1:
        return None
    d = shape.head_dim
    q = (shard.q_heads[0] * d, (shard.q_heads[-1] + 1) * d)
    kv = (shard.kv_heads[0] * d, (shard.kv_heads[-1] + 1) * d)
    f = shard.ffn
    q_rows, kv_rows, inter = shape.num_heads * d, shape.num_kv_heads * d, shape.intermediate_size
    suffix = name.split(".self_attn.", 1)[-1].split(".mlp.", 1)[-1]
    rules: dict[str, Slicing] = {
        "q_proj.weight": (0, (q,)),
        "q_proj.bias": (0, (q,)),
        "k_proj.weight": (0, (kv,)),
        "k_proj.bias": (0, (kv,)),
        "v_proj.weight": (0, (kv,)),
        "v_proj.bias": (0, (kv,)),
        "qkv_proj.weight": (0, (q, _shift(kv, q_rows), _shift(kv, q_rows + kv_rows))),
        "o_proj.weight": (1, (q,)),
        "gate_proj.weight": (0, (f,)),
        "gate_proj.bias": (0, (f,)),
        "up_proj.weight": (0, (f,)),
        "up_proj.bias": (0, (f,)),
        "gate_up_proj.weight": (0, (f, _shift(f, inter))),
        "down_proj.weight": (1, (f,)),
    }
    if shape.variant.qk_norm == "full":  # a weight per element of the whole projection
        rules["q_norm.weight"] = (0, (q,))
        rules["k_norm.weight"] = (0, (kv,))
    if not name.startswith("model.layers."):
        return None
    return rules.get(suffix)


def _shift(r: tuple[int, int], by: int) -> tuple[int, int]:
    return r[0] + by, r[1] + by


def sliced_shape(full: tuple[int, ...], slicing: Slicing | None) -> tuple[int, ...]:
    if slicing is None:
        return full
    dim, ranges = slicing
    out = list(full)
    out[dim] = sum(b - a for a, b in ranges)
    return tuple(out)
