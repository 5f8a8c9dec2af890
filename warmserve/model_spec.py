"""Model shapes: byte sizes, KV footprint and FLOPs, from presets or an HF `config.json`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}


class ModelSpecError(ValueError):
    pass


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF `config.json`: `path` is the file, or the model directory that holds it. Raises
    OSError or json.JSONDecodeError for the caller to word."""
    file = path / "config.json" if path.is_dir() else path
    return json.loads(file.read_text())


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    weight_bytes: int
    num_params: int
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_model_len: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers and all TP ranks together."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def shard_bytes(self, tp: int) -> int:
        return -(-self.weight_bytes // tp)

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        # KV heads are split across TP ranks (replicated when tp > kv heads, as vLLM does).
        return self.kv_bytes_per_token / min(tp, self.num_kv_heads)


def _llama(name: str, weight_bytes: int, layers: int, hidden: int, kv_heads: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        weight_bytes=weight_bytes,
        num_params=weight_bytes // 2,
        num_layers=layers,
        hidden_size=hidden,
        num_kv_heads=kv_heads,
        head_dim=128,
        dtype_bytes=2,
        max_model_len=4096,
    )


# Exact fp16 byte sizes of the Llama-2 checkpoints, as the reference system uses them.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama-2-7b": _llama("llama-2-7b", 13_476_831_232, 32, 4096, 32),
    "llama-2-13b": _llama("llama-2-13b", 26_032_558_080, 40, 5120, 40),
    "llama-2-70b": _llama("llama-2-70b", 137_961_209_856, 80, 8192, 8),
}


def spec_from_hf_config(name: str, cfg: Mapping[str, Any]) -> ModelSpec:
    """Derive a spec from a Llama-family HF `config.json` (Llama, Mistral, Qwen2, SmolLM2)."""
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelSpecError(f"model {name!r}: config.json lacks a usable {e}") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise ModelSpecError(f"model {name!r}: unsupported dtype {dtype!r}")
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    lm_head = 0 if cfg.get("tie_word_embeddings", False) else vocab * hidden
    params = embed + layers * per_layer + hidden + lm_head
    return ModelSpec(
        name=name,
        weight_bytes=params * _DTYPE_BYTES[dtype],
        num_params=params,
        num_layers=layers,
        hidden_size=hidden,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype_bytes=_DTYPE_BYTES[dtype],
        max_model_len=int(cfg.get("max_position_embeddings") or 4096),
    )
