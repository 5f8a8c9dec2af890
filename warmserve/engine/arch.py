"""What the engine implements, checked against a model's `config.json` and checkpoint; torch-free.

Every supported architecture is the Llama decoder plus a few named differences (`Variant`):
biases, per-head or whole-projection q/k norms, where the norms sit, Gemma's (1 + w) norms and
scaled embeddings, sliding-window layers, fused projections in the checkpoint. A config is read
into a `LlamaShape` only if every feature it turns on is one the engine runs; a checkpoint is
accepted only if its tensor names and shapes are exactly the ones that shape needs. Anything
else raises `UnsupportedModel` with one line naming the model, the architecture and the
feature, so a model is refused where it is prepared or loaded rather than served wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnsupportedModel(NotImplementedError):
    """A model the engine would run wrong; the message is one line for a CLI or log."""


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
        raise UnsupportedModel(f"RoPE scaling {kind!r} is not supported (default, linear and "
                               "llama3 are)")  # fmt: skip


# Where a layer's norms sit: (before attention, on attention's output, before the MLP, on the
# MLP's output), each the checkpoint's name for it or None.
NORM_PLACES: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # Llama
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),  # Gemma 3
}


@dataclass(frozen=True, slots=True)
class Variant:
    """How one architecture differs from Llama."""

    model_type: str
    qkv_bias: bool = False  # Q/K/V always biased (Qwen2)
    bias_keys: tuple[str, ...] = ()  # config flags that add biases: attention_bias, mlp_bias
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma 3); "full": over the
    # whole projection before it is split into heads (OLMo 2)
    norms: str = "pre"  # a key of NORM_PLACES
    gemma: bool = False  # (1 + w) norms, embeddings scaled by sqrt(hidden), query_pre_attn_scalar
    norm_scale_fp32: bool = False  # norms scale in fp32 before the cast back (OLMo 2; Llama
    # casts first): the same in fp32, closer to transformers in bf16
    fused_checkpoint: bool = False  # one qkv_proj and one gate_up_proj tensor per layer (Phi-3)
    # How the config states sliding windows: "none", "all" (`sliding_window` applies to every
    # layer when set), or "layer_types" (per layer, `sliding_attention` ones use it).
    sliding: str = "none"
    activations: tuple[str, ...] = ("silu",)


ARCHITECTURES: dict[str, Variant] = {
    "LlamaForCausalLM": Variant("llama", bias_keys=("attention_bias", "mlp_bias")),
    "MistralForCausalLM": Variant("mistral", sliding="all"),
    "Qwen2ForCausalLM": Variant("qwen2", qkv_bias=True, sliding="layer_types"),
    "Qwen3ForCausalLM": Variant(
        "qwen3", bias_keys=("attention_bias",), qk_norm="head", sliding="layer_types"
    ),
    "Gemma3ForCausalLM": Variant(
        "gemma3_text",
        bias_keys=("attention_bias",),
        qk_norm="head",
        norms="sandwich",
        gemma=True,
        sliding="layer_types",
        activations=("gelu_pytorch_tanh",),
    ),
    "Phi3ForCausalLM": Variant("phi3", fused_checkpoint=True, sliding="all"),
    "Olmo2ForCausalLM": Variant(
        "olmo2",
        bias_keys=("attention_bias",),
        qk_norm="full",
        norms="post",
        norm_scale_fp32=True,
    ),
}
_BY_MODEL_TYPE = {v.model_type: arch for arch, v in ARCHITECTURES.items()}

# Config keys that mean mixture-of-experts layers when set to a positive count.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Buffers some checkpoints carry that transformers recomputes from the config and ignores.
_RECOMPUTED = (".rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """A supported model's dimensions and the Llama differences it turns on."""

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
    architecture: str = "LlamaForCausalLM"
    attention_bias: bool = False  # biases on q, k, v and o
    mlp_bias: bool = False
    activation: str = "silu"
    # Per layer: the sliding window (keys within this many positions, the query's own
    # included) or None for full attention.
    windows: tuple[int | None, ...] = ()
    local_rope_theta: float | None = None  # sliding layers' RoPE base where it differs (Gemma 3)
    query_scale: float | None = None  # None: head_dim ** -0.5
    # A tensor-parallel shard of a model with q/k norms over the whole projection (OLMo 2):
    # the whole Q and K widths the norms average over, and whether this rank's K counts in
    # the sum (False on all but one of the ranks sharing a replicated KV head).
    full_norm: tuple[int, int, bool] | None = None

    @property
    def variant(self) -> Variant:
        return ARCHITECTURES[self.architecture]

    @property
    def qkv_bias(self) -> bool:
        return self.variant.qkv_bias or self.attention_bias

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model") -> LlamaShape:
        """The shape of a model the engine runs exactly as transformers does, or
        `UnsupportedModel` naming what it does not implement."""
        arch = _architecture(name, cfg)
        v = ARCHITECTURES[arch]

        def refuse(feature: str) -> UnsupportedModel:
            return UnsupportedModel(f"model {name!r} ({arch}): {feature} is not supported")

        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "?")
            raise refuse(f"a quantized checkpoint (quantization_config {method!r})")
        for key in _MOE_KEYS:
            if int(cfg.get(key) or 0) > 0:
                raise refuse(f"mixture of experts ({key}={cfg[key]})")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) is not None:
                raise refuse(f"logit soft-capping ({key}={cfg[key]})")
        if cfg.get("use_bidirectional_attention"):
            raise refuse("bidirectional attention (use_bidirectional_attention)")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or v.activations[0]
        if act not in v.activations:
            raise refuse(f"activation {act!r} (runs {', '.join(v.activations)})")
        flags = {}
        for key in ("attention_bias", "mlp_bias"):
            flags[key] = bool(cfg.get(key, False))
            if flags[key] and key not in v.bias_keys:
                raise refuse(f"{key}=true")

        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        layers = int(cfg["num_hidden_layers"])
        windows = _windows(cfg, v, layers, refuse)
        rope, local_theta = _rope(cfg, v, windows, refuse)
        theta = rope.get("rope_theta", cfg.get("rope_theta") or 1e4)
        try:
            scaling = RopeScaling.from_hf(rope)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"model {name!r} ({arch}): {e}") from None
        query_scale = None
        if v.gemma:
            query_scale = float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            architecture=arch,
            attention_bias=flags["attention_bias"],
            mlp_bias=flags["mlp_bias"],
            activation=act,
            windows=windows,
            local_rope_theta=local_theta,
            query_scale=query_scale,
        )

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the engine reads, with its shape; a checkpoint must hold exactly these."""
        v = self.variant
        hidden, q_rows = self.hidden_size, self.num_heads * self.head_dim
        kv_rows, inter = self.num_kv_heads * self.head_dim, self.intermediate_size
        out = {"model.embed_tokens.weight": (self.vocab_size, hidden),
               "model.norm.weight": (hidden,)}  # fmt: skip
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, hidden)
        norm_dim = {"head": (self.head_dim, self.head_dim), "full": (q_rows, kv_rows)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            if v.fused_checkpoint:
                out[attn + "qkv_proj.weight"] = (q_rows + 2 * kv_rows, hidden)
                out[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
            else:
                for n, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                    out[f"{attn}{n}_proj.weight"] = (rows, hidden)
                    if self.qkv_bias:
                        out[f"{attn}{n}_proj.bias"] = (rows,)
                out[p + "mlp.gate_proj.weight"] = (inter, hidden)
                out[p + "mlp.up_proj.weight"] = (inter, hidden)
            out[attn + "o_proj.weight"] = (hidden, q_rows)
            if self.attention_bias:
                out[attn + "o_proj.bias"] = (hidden,)
            out[p + "mlp.down_proj.weight"] = (hidden, inter)
            if self.mlp_bias:
                for n, rows in (("gate", inter), ("up", inter), ("down", hidden)):
                    out[f"{p}mlp.{n}_proj.bias"] = (rows,)
            if v.qk_norm is not None:
                q_dim, k_dim = norm_dim[v.qk_norm]
                out[attn + "q_norm.weight"] = (q_dim,)
                out[attn + "k_norm.weight"] = (k_dim,)
            for norm in NORM_PLACES[v.norms]:
                if norm is not None:
                    out[f"{p}{norm}.weight"] = (hidden,)
        return out

    def check_tensors(self, name: str, tensors: Mapping[str, Iterable[int]]) -> None:
        """`UnsupportedModel` unless `tensors` (name -> shape) are exactly the expected ones."""
        want = self.expected_tensors()
        have = {k: tuple(int(d) for d in s) for k, s in tensors.items()
                if not k.endswith(_RECOMPUTED)}  # fmt: skip
        head = f"model {name!r} ({self.architecture}): checkpoint"
        missing = sorted(set(want) - set(have))
        if missing:
            raise UnsupportedModel(f"{head} lacks {_some(missing)}")
        unused = sorted(set(have) - set(want))
        if unused:
            why = " (tie_word_embeddings is true)" if unused == ["lm_head.weight"] else ""
            raise UnsupportedModel(f"{head} has tensors the engine does not use: "
                                   f"{_some(unused)}{why}")  # fmt: skip
        wrong = sorted(k for k in want if have[k] != want[k])
        if wrong:
            k = wrong[0]
            raise UnsupportedModel(
                f"{head} tensor {k} has shape {list(have[k])}, the config implies {list(want[k])}"
                + (f" ({len(wrong) - 1} more)" if len(wrong) > 1 else "")
            )


def _some(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _architecture(name: str, cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or ([_BY_MODEL_TYPE[model_type]]
                                         if model_type in _BY_MODEL_TYPE else [])  # fmt: skip
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        shown = ", ".join(archs) or "none named"
        raise UnsupportedModel(
            f"model {name!r}: architecture {shown} (model_type {model_type!r}) is not supported; "
            f"the engine runs {', '.join(ARCHITECTURES)}"
        )
    arch = archs[0]
    if model_type is not None and model_type != ARCHITECTURES[arch].model_type:
        raise UnsupportedModel(
            f"model {name!r} ({arch}): model_type {model_type!r} is not supported with it "
            f"(expects {ARCHITECTURES[arch].model_type!r})"
        )
    return arch


def _windows(
    cfg: Mapping[str, Any], v: Variant, layers: int, refuse: Callable[[str], UnsupportedModel]
) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if v.sliding == "none":
        return ()
    if v.sliding == "all":
        return (int(window),) * layers if window else ()
    if not v.gemma and not cfg.get("use_sliding_window"):
        window = None  # Qwen2/3 keep `sliding_window` in configs that do not use it
    types = cfg.get("layer_types")
    if types is None:  # configs written before transformers stored layer types
        if v.gemma:
            pattern = int(cfg.get("sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(layers)]  # fmt: skip
        else:
            start = int(cfg.get("max_window_layers") or 0)
            types = ["sliding_attention" if window and i >= start else "full_attention"
                     for i in range(layers)]  # fmt: skip
    if len(types) != layers:
        raise refuse(f"layer_types of {len(types)} entries for {layers} layers")
    out: list[int | None] = []
    for t in types:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention" and window:
            out.append(int(window))
        else:
            raise refuse(f"layer type {t!r}" + ("" if window else " without a sliding_window"))
    return tuple(out) if any(w is not None for w in out) else ()


def _rope(
    cfg: Mapping[str, Any],
    v: Variant,
    windows: tuple[int | None, ...],
    refuse: Callable[[str], UnsupportedModel],
) -> tuple[dict[str, Any], float | None]:
    """The full-attention layers' RoPE parameters, and the sliding layers' base if different."""
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    local_theta = None
    if v.gemma and ("full_attention" in raw or "sliding_attention" in raw):
        local = raw.get("sliding_attention") or {}
        raw = raw.get("full_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise refuse(f"RoPE scaling {local['rope_type']!r} on sliding layers")
        if any(w is not None for w in windows):
            local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq") or 1e4))
    elif v.gemma and cfg.get("rope_local_base_freq") and any(w is not None for w in windows):
        local_theta = float(cfg["rope_local_base_freq"])  # older Gemma 3 configs
    partial = float(raw.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0))
    if partial != 1.0:
        raise refuse(f"partial rotary embeddings (partial_rotary_factor={partial})")
    if cfg.get("rope_scaling") and cfg.get("rope_theta") and "rope_theta" not in raw:
        raw = {**raw, "rope_theta": cfg["rope_theta"]}
    return dict(raw), local_theta


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def check_model_dir(name: str, model_dir: Path) -> LlamaShape:
    """Read a model folder's config and checkpoint headers (no weights) and refuse anything
    the engine does not implement: what `serve` and `models prepare` call before loading."""
    from warmserve.worker.layout import checkpoint_files, read_header

    shape = LlamaShape.from_hf_config(read_config(model_dir), name)
    tensors: dict[str, list[int]] = {}
    for path in checkpoint_files(model_dir):
        tensors.update((k, v["shape"]) for k, v in read_header(path).items())
    shape.check_tensors(name, tensors)
    return shape
