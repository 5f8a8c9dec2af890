"""Llama-family decoder over a paged KV cache: Llama (SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3,
Phi-3 and OLMo 2, each Llama plus the few differences `engine.arch` names and checks.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from warmserve.engine import cpu_attention, cpu_linear
from warmserve.engine.arch import NORM_PLACES, LlamaShape, RopeScaling, UnsupportedModel

__all__ = [
    "LlamaShape",
    "PagedKVCache",
    "PagedLlama",
    "RopeScaling",
    "SeqInput",
    "UnsupportedModel",
]


def _scaled_inv_freq(scaling: RopeScaling, inv_freq: torch.Tensor) -> torch.Tensor:
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between
    # blended linearly in 1 / wavelength.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


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


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, cast back, then scaled."""
    return weight * _rms(x, eps).to(x.dtype)


def _rms_norm_fp32(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's and OLMo 2's RMSNorm: scaled in fp32, then cast (`scale` is fp32: 1 + w for
    Gemma, w for OLMo 2)."""
    return (_rms(x, eps) * scale).to(x.dtype)


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


def _window_mask(
    qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, limit: torch.Tensor | None = None
) -> torch.Tensor:
    """Which keys each query sees: causal (key <= query), within `window` positions of it (the
    query's own included, as transformers' sliding layers), and below `limit` if given."""
    mask = kpos[None, :] <= qpos[:, None]
    if window is not None:
        mask &= kpos[None, :] > qpos[:, None] - window
    if limit is not None:
        mask &= kpos[None, :] < limit[:, None]
    return mask


@dataclass(frozen=True, slots=True)
class _DecodeMeta:
    """The decoding sequences' padded block tables `[B, max_blocks]` and, per window, what
    hides keys from each query: for the torch path a key mask `[B, 1, 1, max_blocks * bs]`
    (`lens` None); for the in-place kernel (`cpu_attention`) the first key each query sees,
    with `lens` the keys per sequence."""

    tables: torch.Tensor
    hide: dict[int | None, torch.Tensor]
    lens: torch.Tensor | None


@dataclass(slots=True)
class _Layer:
    w: dict[str, torch.Tensor]
    qkv: torch.Tensor | None  # Q/K/V as one weight (a view over the three, or Phi-3's tensor)
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None
    norms: tuple[torch.Tensor | None, ...]  # NORM_PLACES order; Gemma's hold 1 + w in fp32
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    window: int | None
    local_rope: bool  # this layer's RoPE is the sliding layers' own base (Gemma 3)


class PagedLlama:
    """The Llama decoder with the named differences of `arch.Variant` (Mistral, Qwen2, Qwen3,
    Gemma 3, Phi-3 and OLMo 2 are Llama plus a few of them)."""

    def __init__(
        self,
        shape: LlamaShape,
        params: Mapping[str, torch.Tensor],
        fuse: bool | None = None,
        name: str = "model",
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """`fuse`: run Q/K/V and gate/up as one matmul each where they lie back to back. By
        default only on a GPU: on this project's 2-core CPUs the wider matmuls were no faster
        (SmolLM2 at 8 concurrent: 53 tok/s fused, 61 separate; 1.2 GB Llama prefill slower).
        Phi-3 checkpoints store them fused, and run so everywhere.

        The parameters must be exactly those the shape needs (`UnsupportedModel` otherwise);
        an in-memory `lm_head.weight` that is the embedding itself (a tied model's state
        dict) is accepted.

        `reduce`: a rank of a tensor-parallel group (`shape` is then its `tp.shard_shape`)
        sums the row-parallel outputs of o_proj and down_proj over the group in place with
        it, before their (replicated) biases (and OLMo 2's sums of squares for its q/k norms);
        a forward makes exactly the sums `sum_shapes` lists."""
        self.shape = shape
        self.reduce = reduce
        v = shape.variant
        p = dict(params)
        self.embed = p.get("model.embed_tokens.weight")
        head = p.get("lm_head.weight")
        if (
            shape.tie_word_embeddings
            and head is not None
            and self.embed is not None
            and (head.data_ptr() == self.embed.data_ptr())
        ):
            del p["lm_head.weight"]
        # A worker's slot may hold projections packed for the CPU kernel: checked as the
        # `[out, in]` weights they stand for.
        shape.check_tensors(name, {k: cpu_linear.logical_shape(t) for k, t in p.items()})
        assert self.embed is not None
        self.device = self.embed.device
        if fuse is None:
            fuse = self.device.type == "cuda"
        self.lm_head = self.embed if shape.tie_word_embeddings else p["lm_head.weight"]
        # Gemma's (1 + w) and OLMo 2's norm scales are made once here in fp32, as transformers
        # computes them (a few KB a layer), not on every step.
        self._norm = _rms_norm_fp32 if v.gemma or v.norm_scale_fp32 else _rms_norm
        self._qk_norm = v.qk_norm
        offset = 1.0 if v.gemma else 0.0

        def prep(t: torch.Tensor) -> torch.Tensor:
            return t.float() + offset if v.gemma or v.norm_scale_fp32 else t

        self.norm = prep(p["model.norm.weight"])
        self.embed_scale = (
            torch.tensor(shape.hidden_size**0.5, dtype=self.embed.dtype, device=self.device)
            if v.gemma
            else None
        )
        self.layers: list[_Layer] = []
        for i in range(shape.num_layers):
            prefix = f"model.layers.{i}."
            w = {k.removeprefix(prefix): t for k, t in p.items() if k.startswith(prefix)}
            qkv = qkv_bias = gate_up = None
            if v.fused_checkpoint:
                qkv, gate_up = w["self_attn.qkv_proj.weight"], w["mlp.gate_up_proj.weight"]
            elif fuse:
                qkv = adjacent_view([w[f"self_attn.{n}_proj.weight"] for n in "qkv"])
                gate_up = adjacent_view([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])
                if shape.qkv_bias:  # biased projections fuse only with their biases
                    qkv_bias = adjacent_view([w[f"self_attn.{n}_proj.bias"] for n in "qkv"])
                    if qkv_bias is None:
                        qkv = None
                if shape.mlp_bias:
                    gate_up = None
            norms = tuple(None if n is None else prep(w[f"{n}.weight"])
                          for n in NORM_PLACES[v.norms])  # fmt: skip
            q_norm = k_norm = None
            if v.qk_norm is not None:
                q_norm = prep(w["self_attn.q_norm.weight"])
                k_norm = prep(w["self_attn.k_norm.weight"])
            window = shape.window(i)
            local = window is not None and shape.local_rope_theta is not None
            self.layers.append(_Layer(w, qkv, qkv_bias, gate_up, norms, q_norm, k_norm, window,
                                      local))  # fmt: skip
        self.fused_layers = sum(layer.qkv is not None for layer in self.layers)
        self._inv_freq = self._inv(shape.rope_theta, shape.rope_scaling)
        self._local_inv_freq = (
            self._inv(shape.local_rope_theta, None) if shape.local_rope_theta is not None else None
        )
        self._windows = sorted({layer.window for layer in self.layers}, key=lambda w: w or 0)
        # Decode attention straight from the cache's blocks where the CPU kernel runs it.
        self.paged_attention = cpu_attention.supports(self.device, self.embed.dtype, shape.head_dim)
        self._act = (
            (lambda t: F.gelu(t, approximate="tanh"))
            if shape.activation == "gelu_pytorch_tanh"
            else F.silu
        )

    def _inv(self, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
        d = self.shape.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
        if scaling is not None:
            inv = _scaled_inv_freq(scaling, inv)
        return inv.to(self.device)

    @staticmethod
    def _rope(
        inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def _decode_meta(self, seqs: Sequence[SeqInput], bs: int, cache: PagedKVCache) -> _DecodeMeta:
        """What the decoding sequences' attention needs, built once a step."""
        lens = [q.start + 1 for q in seqs]
        width = max(-(-n // bs) for n in lens)
        rows = [list(q.block_table[: -(-n // bs)]) for q, n in zip(seqs, lens, strict=True)]
        tables = self._tensor([r + [0] * (width - len(r)) for r in rows])
        qpos = self._tensor([q.start for q in seqs])
        if self.paged_attention and cache.k.dtype == torch.float32:
            zero = torch.zeros_like(qpos)
            first = {w: zero if w is None else qpos - (w - 1) for w in self._windows}
            return _DecodeMeta(tables, first, qpos + 1)
        kpos = torch.arange(width * bs, device=self.device)
        masks = {w: _window_mask(qpos, kpos, w)[:, None, None, :] for w in self._windows}
        return _DecodeMeta(tables, masks, None)

    def _tensor(self, data: Sequence) -> torch.Tensor:
        """Host-built indices on the model's device (one transfer each on a GPU)."""
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _decode_attention(
        self,
        q: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        meta: _DecodeMeta,
        window: int | None,
    ) -> torch.Tensor:
        s = self.shape
        tables, mask = meta.tables, meta.hide[window]
        if meta.lens is not None:  # the in-place kernel: `mask` is each query's first key
            scale = s.head_dim**-0.5 if s.query_scale is None else s.query_scale
            return cpu_attention.decode_attention(
                q, cache.k[layer], cache.v[layer], tables, meta.lens, mask, scale
            )
        b = q.shape[0]
        kk = cache.k[layer][tables].reshape(b, -1, s.num_kv_heads, s.head_dim).to(q.dtype)
        vv = cache.v[layer][tables].reshape(b, -1, s.num_kv_heads, s.head_dim).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [B, heads, 1, head_dim]
            kk.transpose(1, 2),
            vv.transpose(1, 2),
            attn_mask=mask,
            enable_gqa=True,
            scale=s.query_scale,
        )
        return o[:, :, 0, :]

    def _linear(self, x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return cpu_linear.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    def sum_shapes(self, tokens: int) -> list[tuple[tuple[int, int], torch.dtype]]:
        """The shape and dtype of each of `reduce`'s sums in a forward of `tokens` new tokens,
        in order (a rank whose forward fails makes the ones it still owes)."""
        act = ((tokens, self.shape.hidden_size), self.embed.dtype)
        norms = [((tokens, 2), torch.float32)] if self.shape.full_norm is not None else []
        return [*norms, act, act] * self.shape.num_layers

    def _shard_full_norms(
        self, q: torch.Tensor, k: torch.Tensor, layer: _Layer, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMS norms over the whole Q and K projections, of which this rank holds a slice:
        the sums of squares are summed over the group (one small sum for both)."""
        assert self.reduce is not None and self.shape.full_norm is not None
        q_width, k_width, k_counts = self.shape.full_norm
        q32, k32 = q.float(), k.float()
        sq = torch.stack((q32.pow(2).sum(-1), k32.pow(2).sum(-1)), dim=-1)
        if not k_counts:  # another rank holding this KV head counts it
            sq[:, 1] = 0
        self.reduce(sq)
        qn = q32 * torch.rsqrt(sq[:, :1] / q_width + eps)
        kn = k32 * torch.rsqrt(sq[:, 1:] / k_width + eps)
        if self._norm is _rms_norm_fp32:
            return (qn * layer.q_norm).to(q.dtype), (kn * layer.k_norm).to(k.dtype)
        return layer.q_norm * qn.to(q.dtype), layer.k_norm * kn.to(k.dtype)

    def _row_parallel(self, x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if self.reduce is None:
            return self._linear(x, w, name)
        out = cpu_linear.linear(x, w[name + ".weight"])
        self.reduce(out)  # the partial sums of every rank, then the bias once
        bias = w.get(name + ".bias")
        return out if bias is None else out + bias

    @torch.inference_mode()
    def forward(
        self, seqs: Sequence[SeqInput], cache: PagedKVCache, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Logits of the last new token of each sequence, `[len(seqs), vocab]`; with `rows`,
        of those rows of the step's new tokens instead (prompt log-probabilities need all)."""
        x, bounds = self._layers(seqs, cache)
        last = self._tensor(bounds[1:]) - 1 if rows is None else self._tensor(list(rows))
        h = self._norm(x[last], self.norm, self.shape.rms_norm_eps)
        # `W @ h.T`, not `h @ W.T`: with a tall vocabulary matrix and a few rows, the CPU BLAS
        # runs the former 1.5-2x faster (SmolLM2, 32 rows: 34 vs 53 ms); same result.
        if cpu_linear.is_packed(self.lm_head):
            return cpu_linear.linear(h, self.lm_head)
        return torch.mm(self.lm_head, h.t()).t().contiguous()

    @torch.inference_mode()
    def forward_layers(self, seqs: Sequence[SeqInput], cache: PagedKVCache) -> None:
        """The step without the head: the new tokens' K/V into the cache (and, on a
        tensor-parallel rank, its part of every sum). A TP follower runs this: its logits
        would only repeat the leader's."""
        self._layers(seqs, cache)

    def _layers(
        self, seqs: Sequence[SeqInput], cache: PagedKVCache
    ) -> tuple[torch.Tensor, list[int]]:
        """The hidden states after the last layer, and where each sequence's rows start."""
        s = self.shape
        bs = cache.block_size
        ids = self._tensor([t for q in seqs for t in q.token_ids])
        positions = self._tensor([q.start + j for q in seqs for j in range(len(q.token_ids))])
        # Where each new token's K/V goes: (block, offset) from its sequence's block table.
        slots_b = self._tensor(
            [q.block_table[(q.start + j) // bs] for q in seqs for j in range(len(q.token_ids))]
        )
        slots_o = positions % bs
        x = cpu_linear.rows(self.embed, ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        ropes = {False: self._rope(self._inv_freq, positions, x.dtype)}
        if self._local_inv_freq is not None:
            ropes[True] = self._rope(self._local_inv_freq, positions, x.dtype)
        bounds = [0]
        for q in seqs:
            bounds.append(bounds[-1] + len(q.token_ids))
        decode = [n for n, q in enumerate(seqs) if len(q.token_ids) == 1]
        decode_rows = self._tensor([bounds[n] for n in decode])
        all_decode = len(decode) == len(seqs)
        if decode:
            dec_meta = self._decode_meta([seqs[n] for n in decode], bs, cache)
        multi = [self._multi_meta(seqs[n], bounds[n], bounds[n + 1], bs)
                 for n, q in enumerate(seqs) if len(q.token_ids) != 1]  # fmt: skip
        q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        eps, norm = s.rms_norm_eps, self._norm
        for li, layer in enumerate(self.layers):
            w = layer.w
            attn_in, attn_out, mlp_in, mlp_out = layer.norms
            h = x if attn_in is None else norm(x, attn_in, eps)
            if layer.qkv is not None:
                qkv = cpu_linear.linear(h, layer.qkv, layer.qkv_bias)
                q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
            else:
                q = self._linear(h, w, "self_attn.q_proj")
                k = self._linear(h, w, "self_attn.k_proj")
                v = self._linear(h, w, "self_attn.v_proj")
            if self._qk_norm == "full" and s.full_norm is not None:  # OLMo 2, a TP shard
                q, k = self._shard_full_norms(q, k, layer, eps)
            elif self._qk_norm == "full":  # OLMo 2: over the whole projection
                q, k = norm(q, layer.q_norm, eps), norm(k, layer.k_norm, eps)
            q = q.reshape(-1, s.num_heads, s.head_dim)
            k = k.reshape(-1, s.num_kv_heads, s.head_dim)
            v = v.reshape(-1, s.num_kv_heads, s.head_dim)
            if self._qk_norm == "head":  # Qwen3, Gemma 3: each head on its own
                q, k = norm(q, layer.q_norm, eps), norm(k, layer.k_norm, eps)
            cos, sin = ropes[layer.local_rope]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[li, slots_b, slots_o] = k.to(cache.k.dtype)
            cache.v[li, slots_b, slots_o] = v.to(cache.v.dtype)
            if all_decode:  # the common step: no rows to pick out or put back
                out = self._decode_attention(q, cache, li, dec_meta, layer.window)
            else:
                out = torch.empty_like(q)
            if decode and not all_decode:  # all one-token sequences in one attention call
                out[decode_rows] = self._decode_attention(
                    q[decode_rows], cache, li, dec_meta, layer.window
                )
            for lo, hi, blocks, masks in multi:
                # 4-D inputs: torch's CPU flash kernel takes only those (3-D ones run the
                # slower math path).
                qq = q[lo:hi].transpose(0, 1)[None]
                mask = masks[layer.window]
                if blocks is None:  # a whole prompt: its keys are this step's
                    kk, vv = k[lo:hi], v[lo:hi]
                else:
                    total = mask.shape[-1]
                    kk = cache.k[li, blocks].reshape(-1, s.num_kv_heads, s.head_dim)[:total]
                    vv = cache.v[li, blocks].reshape(-1, s.num_kv_heads, s.head_dim)[:total]
                o = F.scaled_dot_product_attention(
                    qq, kk.to(q.dtype).transpose(0, 1)[None], vv.to(q.dtype).transpose(0, 1)[None],
                    attn_mask=mask, is_causal=mask is None, enable_gqa=True, scale=s.query_scale,
                )  # fmt: skip
                out[lo:hi] = o[0].transpose(0, 1)
            a = self._row_parallel(out.reshape(-1, q_width), w, "self_attn.o_proj")
            x = x + (a if attn_out is None else norm(a, attn_out, eps))
            h = x if mlp_in is None else norm(x, mlp_in, eps)
            if layer.gate_up is not None:
                gate, up = cpu_linear.linear(h, layer.gate_up).chunk(2, dim=-1)
            else:
                gate = self._linear(h, w, "mlp.gate_proj")
                up = self._linear(h, w, "mlp.up_proj")
            m = self._row_parallel(self._act(gate) * up, w, "mlp.down_proj")
            x = x + (m if mlp_out is None else norm(m, mlp_out, eps))
        return x, bounds

    def _multi_meta(
        self, seq: SeqInput, lo: int, hi: int, bs: int
    ) -> tuple[int, int, torch.Tensor | None, dict[int | None, torch.Tensor | None]]:
        """A multi-token sequence's rows, the blocks of its context (None for a whole prompt,
        whose keys are this step's own) and its masks per window (None: plain causal), built
        once a step rather than once a layer."""
        total = seq.start + (hi - lo)
        qpos = torch.arange(seq.start, total, device=self.device)
        kpos = torch.arange(total, device=self.device)
        masks: dict[int | None, torch.Tensor | None] = {}
        for w in self._windows:
            plain = seq.start == 0 and (w is None or w >= total)
            masks[w] = None if plain else _window_mask(qpos, kpos, w)
        if seq.start == 0:
            return lo, hi, None, masks
        return lo, hi, self._tensor(list(seq.block_table[: -(-total // bs)])), masks
