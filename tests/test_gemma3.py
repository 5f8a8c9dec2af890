"""Golden test on a second real model: Gemma-3-270M (Gemma 3: sliding-window layers of 512
tokens, q/k norms, (1 + w) norms, scaled embeddings), prepared from its packaged GGUF."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.engine.arch import check_model_dir
from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.request import SamplingParams
from warmserve.engine.scheduler import Scheduler


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gemma3_dir)


def test_prepared_folder_is_the_gemma3_the_engine_checks(gemma3_dir):
    shape = check_model_dir("gemma3-270m", gemma3_dir)
    assert shape.architecture == "Gemma3ForCausalLM"
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim) == (
        18, 640, 1, 256)  # fmt: skip
    assert shape.windows.count(512) == 15 and shape.windows.count(None) == 3
    assert shape.tie_word_embeddings and shape.local_rope_theta == 10000.0


def test_gemma3_logits_and_greedy_tokens_match_transformers(gemma):
    model, tok = gemma
    ids = tok("The Eiffel Tower is in the city of")["input_ids"]
    shape = LlamaShape.from_hf_config(model.config.to_dict(), "gemma3-270m")
    engine = PagedLlama(shape, model.state_dict())
    cache = PagedKVCache(shape, 8, 16, torch.float32)
    ours = engine.forward([SeqInput(ids, 0, [5, 2, 7])], cache)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)

    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    want = want[0, len(ids) :].tolist()
    sched = Scheduler(BlockAllocator(16, 16))
    eng = Engine(engine, PagedKVCache(shape, 16, 16, torch.float32), sched, tok.eos_token_id)
    got = eng.generate([ids], SamplingParams(max_tokens=12))[0]
    assert got == want[: len(got)]
    assert "Paris" in tok.decode(got)


def test_gemma3_beyond_its_sliding_window_matches_transformers(gemma):
    """A 600-token context, prefilled in chunks: the sliding layers see only the last 512."""
    model, _ = gemma
    ids = torch.randint(10, 20000, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    shape = LlamaShape.from_hf_config(model.config.to_dict(), "gemma3-270m")
    engine = PagedLlama(shape, model.state_dict())
    cache = PagedKVCache(shape, 48, 16, torch.float32)
    table = list(range(47, 9, -1))  # 38 blocks of 16, scattered in reverse
    for lo, hi in ((0, 256), (256, 592)):
        engine.forward([SeqInput(ids[lo:hi], lo, table)], cache)
    for pos in range(592, 600):  # then one token a step
        ours = engine.forward([SeqInput([ids[pos]], pos, table)], cache)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
