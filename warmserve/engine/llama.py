"""Llama-family decoder over a paged KV cache (Llama, SmolLM2, Mistral; Qwen2 with qkv bias).

Parameters are plain tensors taken from an HF state dict (they may be views into a memory pool
slot). Where a layer's Q, K and V projections (and its gate and up projections) lie back to back
in memory, as a worker's slot layout places them, they can run as one matmul over a view
spanning them: fewer, larger matmuls and no copy (by default on a GPU only; see `PagedLlama`).
The KV cache is paged in blocks (`PagedKVCache`); a sequence's tokens live in the blocks of its
block table, in order. A forward step takes any mix of sequences, each with some new tokens
starting at some position: prefill is many new tokens, decode is one. Linear layers run over
all new tokens at once; one attention call covers all the decoding sequences, and each
multi-token one has its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Context extension of RoPE: `linear` (positions / factor) or `llama3` (per-frequency
    interpolation between low and high wavelengths, as in Llama 3.1)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any] | None) -> RopeScaling | None:
        if not raw:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind in (None, "default"):
            return None
        if kind == "linear":
            return cls("linear", float(raw["factor"]))
        if kind == "llama3":
            return cls("llama3", float(raw["factor"]), float(raw["low_freq_factor"]),
                       float(raw["high_freq_factor"]),
                       int(raw["original_max_position_embeddings"]))  # fmt: skip
        raise NotImplementedError(f"RoPE scaling {kind!r} is not supported (linear and llama3 are)")

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return inv_freq / self.factor
        old = self.original_max_position_embeddings
        low_wavelen = old / self.low_freq_factor
        high_wavelen = old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are interpolated by `factor`, short ones kept, the band between
        # blended linearly in 1 / wavelength.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)


@dataclass(frozen=True, slots=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> LlamaShape:
        heads = int(cfg["num_attention_heads"])
        scaling = RopeScaling.from_hf(cfg.get("rope_scaling") or cfg.get("rope_parameters"))
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )


@dataclass(frozen=True, slots=True)
class SeqInput:
    """One sequence's part of a step: new tokens from `start` on, and its block table."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]


class PagedKVCache:
    """Block-major storage: `[blocks, layers, 2 (K, V), block_size, kv_heads, head_dim]`.

    A block's K and V for every layer are contiguous, so the last pages of the buffer hold only
    the highest-numbered blocks: a worker can lend its KV slot's tail pages once those blocks
    are free. `k` and `v` are `[layers, blocks, ...]` views of the same storage.
    """

    def __init__(
        self,
        shape: LlamaShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        storage = torch.zeros(self.size(shape, num_blocks, block_size), dtype=dtype, device=device)
        self._attach(storage, block_size)

    @staticmethod
    def size(shape: LlamaShape, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, shape.num_layers, 2, block_size, shape.num_kv_heads, shape.head_dim)

    @staticmethod
    def block_bytes(shape: LlamaShape, block_size: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return shape.num_layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * item

    def _attach(self, storage: torch.Tensor, block_size: int) -> None:
        self.block_size = block_size
        self.storage = storage
        self.k = storage[:, :, 0].transpose(0, 1)
        self.v = storage[:, :, 1].transpose(0, 1)

    @classmethod
    def from_buffer(
        cls,
        shape: LlamaShape,
        buf: torch.Tensor,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
    ) -> PagedKVCache:
        """K and V as views of a uint8 buffer (e.g. a pool slot): no allocation, no copy."""
        nbytes = num_blocks * cls.block_bytes(shape, block_size, dtype)
        assert buf.numel() >= nbytes, "buffer too small for the KV cache"
        cache = cls.__new__(cls)
        cache._attach(buf[:nbytes].view(dtype).view(cls.size(shape, num_blocks, block_size)),
                      block_size)  # fmt: skip
        return cache


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def adjacent_view(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """One tensor over parts that lie back to back in one storage (concatenated on dim 0, as a
    view, no copy), or None if they do not."""
    first = parts[0]
    if first is None or not all(t is not None and t.is_contiguous() for t in parts):
        return None
    tail = first.shape[1:]
    end = first.data_ptr() + first.nbytes
    for t in parts[1:]:
        assert t is not None
        if t.dtype != first.dtype or t.shape[1:] != tail or t.data_ptr() != end:
            return None
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        end += t.nbytes
    rows = sum(t.shape[0] for t in parts if t is not None)
    return torch.as_strided(first, (rows, *tail), first.stride())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    def __init__(
        self, shape: LlamaShape, params: Mapping[str, torch.Tensor], fuse: bool | None = None
    ) -> None:
        """`fuse`: run Q/K/V and gate/up as one matmul each where they lie back to back. By
        default only on a GPU: on this project's 2-core CPUs the wider matmuls were no faster
        (SmolLM2 at 8 concurrent: 53 tok/s fused, 61 separate; 1.2 GB Llama prefill slower)."""
        self.shape = shape
        p = dict(params)
        self.embed = p["model.embed_tokens.weight"]
        self.device = self.embed.device
        if fuse is None:
            fuse = self.device.type == "cuda"
        self.norm = p["model.norm.weight"]
        self.lm_head = self.embed if shape.tie_word_embeddings else p["lm_head.weight"]
        self.layers = []
        for i in range(shape.num_layers):
            prefix = f"model.layers.{i}."
            w = {k.removeprefix(prefix): v for k, v in p.items() if k.startswith(prefix)}
            qkv = [w[f"self_attn.{n}_proj.weight"] for n in "qkv"]
            qkv_bias = [w.get(f"self_attn.{n}_proj.bias") for n in "qkv"]
            gate_up = [w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]
            fused: dict[str, torch.Tensor | None] = dict.fromkeys(("qkv", "qkv_bias", "gate_up"))
            if fuse:
                fused["qkv"] = adjacent_view(qkv)
                fused["gate_up"] = adjacent_view(gate_up)
                if qkv_bias[0] is not None:  # biased projections fuse only with their biases
                    fused["qkv_bias"] = adjacent_view(qkv_bias)
                    if fused["qkv_bias"] is None:
                        fused["qkv"] = None
            self.layers.append((w, fused))
        self.fused_layers = sum(f["qkv"] is not None for _, f in self.layers)
        inv = 1.0 / (
            shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
        )
        if shape.rope_scaling is not None:
            inv = shape.rope_scaling.apply(inv)
        self._inv_freq = inv.to(self.device)

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _decode_meta(self, seqs: Sequence[SeqInput], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded block tables `[B, max_blocks]` and a key mask `[B, max_blocks * bs]`."""
        lens = [q.start + 1 for q in seqs]
        width = max(-(-n // bs) for n in lens)
        rows = [list(q.block_table[: -(-n // bs)]) for q, n in zip(seqs, lens, strict=True)]
        tables = self._tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.arange(width * bs, device=self.device)[None, :] < self._tensor(lens)[:, None]
        return tables, mask

    def _tensor(self, data: Sequence) -> torch.Tensor:
        """Host-built indices on the model's device (one transfer each on a GPU)."""
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _decode_attention(
        self,
        q: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        meta: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        assert meta is not None
        tables, mask = meta
        s = self.shape
        b = q.shape[0]
        kk = cache.k[layer][tables].reshape(b, -1, s.num_kv_heads, s.head_dim).to(q.dtype)
        vv = cache.v[layer][tables].reshape(b, -1, s.num_kv_heads, s.head_dim).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [B, heads, 1, head_dim]
            kk.transpose(1, 2),
            vv.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            enable_gqa=True,
        )
        return o[:, :, 0, :]

    @torch.inference_mode()
    def forward(
        self, seqs: Sequence[SeqInput], cache: PagedKVCache, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Logits of the last new token of each sequence, `[len(seqs), vocab]`; with `rows`,
        of those rows of the step's new tokens instead (prompt log-probabilities need all)."""
        s = self.shape
        bs = cache.block_size
        ids = self._tensor([t for q in seqs for t in q.token_ids])
        positions = self._tensor([q.start + j for q in seqs for j in range(len(q.token_ids))])
        # Where each new token's K/V goes: (block, offset) from its sequence's block table.
        slots_b = self._tensor(
            [q.block_table[(q.start + j) // bs] for q in seqs for j in range(len(q.token_ids))]
        )
        slots_o = positions % bs
        x = self.embed[ids]
        cos, sin = self._rope(positions, x.dtype)
        bounds = [0]
        for q in seqs:
            bounds.append(bounds[-1] + len(q.token_ids))
        decode = [n for n, q in enumerate(seqs) if len(q.token_ids) == 1]
        multi = [n for n, q in enumerate(seqs) if len(q.token_ids) != 1]
        decode_rows = self._tensor([bounds[n] for n in decode])
        dec_meta = self._decode_meta([seqs[n] for n in decode], bs) if decode else None
        q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for li, (w, fused) in enumerate(self.layers):
            h = _rms_norm(x, w["input_layernorm.weight"], s.rms_norm_eps)
            if fused["qkv"] is not None:
                qkv = F.linear(h, fused["qkv"], fused["qkv_bias"])
                q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
            else:
                q = F.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
                k = F.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
                v = F.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
            q = q.reshape(-1, s.num_heads, s.head_dim)
            k = k.reshape(-1, s.num_kv_heads, s.head_dim)
            v = v.reshape(-1, s.num_kv_heads, s.head_dim)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            cache.k[li, slots_b, slots_o] = k.to(cache.k.dtype)
            cache.v[li, slots_b, slots_o] = v.to(cache.v.dtype)
            out = torch.empty_like(q)
            if decode:  # all one-token sequences in one attention call
                out[decode_rows] = self._decode_attention(q[decode_rows], cache, li, dec_meta)
            for n in multi:
                seq = seqs[n]
                lo, hi = bounds[n], bounds[n + 1]
                # 4-D inputs: torch's CPU flash kernel takes only those (3-D ones run the
                # slower math path).
                qq = q[lo:hi].transpose(0, 1)[None]
                if seq.start == 0:  # a whole prompt: its keys are this step's, plain causal
                    o = F.scaled_dot_product_attention(
                        qq, k[lo:hi].transpose(0, 1)[None], v[lo:hi].transpose(0, 1)[None],
                        is_causal=True, enable_gqa=True,
                    )  # fmt: skip
                    out[lo:hi] = o[0].transpose(0, 1)
                    continue
                total = seq.start + (hi - lo)
                blocks = self._tensor(list(seq.block_table[: -(-total // bs)]))
                kk = cache.k[li, blocks].reshape(-1, s.num_kv_heads, s.head_dim)[:total]
                vv = cache.v[li, blocks].reshape(-1, s.num_kv_heads, s.head_dim)[:total]
                # Causal over the whole context: query j (absolute start + j) sees keys <= it.
                qpos = torch.arange(seq.start, total, device=self.device)[:, None]
                mask = torch.arange(total, device=self.device)[None, :] <= qpos
                o = F.scaled_dot_product_attention(
                    qq, kk.to(q.dtype).transpose(0, 1)[None], vv.to(q.dtype).transpose(0, 1)[None],
                    attn_mask=mask, enable_gqa=True,
                )  # fmt: skip
                out[lo:hi] = o[0].transpose(0, 1)
            x = x + F.linear(
                out.reshape(-1, s.num_heads * s.head_dim), w["self_attn.o_proj.weight"]
            )
            h = _rms_norm(x, w["post_attention_layernorm.weight"], s.rms_norm_eps)
            if fused["gate_up"] is not None:
                gate, up = F.linear(h, fused["gate_up"]).chunk(2, dim=-1)
            else:
                gate = F.linear(h, w["mlp.gate_proj.weight"])
                up = F.linear(h, w["mlp.up_proj.weight"])
            x = x + F.linear(F.silu(gate) * up, w["mlp.down_proj.weight"])
        last = self._tensor(bounds[1:]) - 1 if rows is None else self._tensor(list(rows))
        h = _rms_norm(x[last], self.norm, s.rms_norm_eps)
        # `W @ h.T`, not `h @ W.T`: with a tall vocabulary matrix and a few rows, the CPU BLAS
        # runs the former 1.5-2x faster (SmolLM2, 32 rows: 34 vs 53 ms); same result.
        return torch.mm(self.lm_head, h.t()).t().contiguous()
