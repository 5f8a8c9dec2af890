"""Golden tests: the paged engine's logits match HF transformers (fp32, CPU)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from warmserve.engine import cpu_linear
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama, SeqInput
from warmserve.worker.layout import checkpoint_files
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.weights import load_into_slot

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    else:  # Qwen2: biases on q/k/v, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    return model.eval().float()


def ours(model: torch.nn.Module, num_blocks: int = 16, block_size: int = 4):
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    engine = PagedLlama(shape, model.state_dict())
    return engine, PagedKVCache(shape, num_blocks, block_size, torch.float32)


def ours_in_slot(
    model: torch.nn.Module, tmp_path, num_blocks: int = 16, block_size: int = 4, pack=False
):
    """The engine over weights loaded into a pool slot, as a worker holds them: each layer's
    Q/K/V and gate/up lie side by side and run as fused matmuls over views (with `pack`,
    views of the projections packed for the CPU kernel)."""
    model.save_pretrained(tmp_path)
    pool = PagePool(CpuPages(4), asynchronous=False)
    slot = pool.new_slot(PageUse.WEIGHTS)
    rule = cpu_linear.packable if pack else None
    params = load_into_slot(pool, slot, checkpoint_files(tmp_path), pack=rule)
    assert all(cpu_linear.is_packed(t) == (pack and k.endswith("_proj.weight"))
               for k, t in params.items())  # fmt: skip
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    engine = PagedLlama(shape, params, fuse=True)
    assert engine.fused_layers == shape.num_layers
    return engine, PagedKVCache(shape, num_blocks, block_size, torch.float32)


def hf_last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("weights", ["separate", "slot", "packed"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_and_stepwise_decode_match_transformers(kind, weights, tmp_path):
    if weights == "packed" and not cpu_linear.available():
        pytest.skip("no C compiler for the CPU linear kernel")
    model = tiny_model(kind)
    if weights == "separate":
        engine, cache = ours(model)
    else:
        engine, cache = ours_in_slot(model, tmp_path, pack=weights == "packed")
    assert engine.fused_layers == (0 if weights == "separate" else 2)
    table = [11, 3, 7, 0, 14, 5]  # scattered blocks: the cache is really paged
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = engine.forward([SeqInput(ids, 0, table)], cache)[0]
    torch.testing.assert_close(logits, hf_last_logits(model, ids), atol=1e-5, rtol=1e-4)
    for _ in range(8):  # greedy decode, one token a step, crossing block boundaries
        nxt = int(logits.argmax())
        assert nxt == int(hf_last_logits(model, ids).argmax())
        ids.append(nxt)
        logits = engine.forward([SeqInput([nxt], len(ids) - 1, table)], cache)[0]
        torch.testing.assert_close(logits, hf_last_logits(model, ids), atol=1e-5, rtol=1e-4)


def test_mixed_batch_of_prefill_and_decode_equals_separate_runs():
    model = tiny_model("llama")
    engine, cache = ours(model, num_blocks=32)
    alloc = BlockAllocator(32, 4)
    a = list(range(1, 10))
    b = list(range(20, 26))
    ta, tb = alloc.allocate(alloc.blocks_for(16)), alloc.allocate(alloc.blocks_for(16))
    engine.forward([SeqInput(a, 0, ta)], cache)  # a is prefilled first
    # One step: a decodes one token while b prefills its whole prompt.
    out = engine.forward([SeqInput([42], len(a), ta), SeqInput(b, 0, tb)], cache)
    torch.testing.assert_close(out[0], hf_last_logits(model, [*a, 42]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], hf_last_logits(model, b), atol=1e-5, rtol=1e-4)
    alloc.free(ta)
    alloc.free(tb)
    alloc.check()


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("llama")
    engine, cache = ours(model)
    ids = list(range(3, 17))
    table = [4, 9, 1, 12]
    engine.forward([SeqInput(ids[:5], 0, table)], cache)
    engine.forward([SeqInput(ids[5:9], 5, table)], cache)
    last = engine.forward([SeqInput(ids[9:], 9, table)], cache)[0]
    torch.testing.assert_close(last, hf_last_logits(model, ids), atol=1e-5, rtol=1e-4)


def test_block_allocator_conserves_blocks():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.lists(st.tuples(st.booleans(), st.integers(1, 5)), max_size=60))
    def run(ops):
        alloc = BlockAllocator(12, 4)
        held: list[list[int]] = []
        for is_alloc, n in ops:
            if is_alloc and alloc.can_allocate(n):
                held.append(alloc.allocate(n))
            elif held:
                alloc.free(held.pop(n % len(held)))
            alloc.check()
            flat = [b for h in held for b in h]
            assert len(flat) == len(set(flat)) == 12 - alloc.num_free

    run()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },  # head_dim 16, original length 32: the keep, blend and scale bands all occur
    ],
)
def test_rope_scaling_matches_transformers(rope):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "max_position_embeddings": 128},
                      rope_parameters={**rope, "rope_theta": 10000.0})  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().float()
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    assert shape.rope_scaling is not None and shape.rope_scaling.kind == rope["rope_type"]
    engine = PagedLlama(shape, model.state_dict())
    cache = PagedKVCache(shape, 16, 4, torch.float32)
    ids = torch.randint(0, 97, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = engine.forward([SeqInput(ids, 0, list(range(12)))], cache)[0]
    torch.testing.assert_close(logits, hf_last_logits(model, ids), atol=1e-5, rtol=1e-4)
    plain = LlamaShape.from_hf_config({**model.config.to_dict(), "rope_parameters": None})
    unscaled = PagedLlama(plain, model.state_dict()).forward(
        [SeqInput(ids, 0, list(range(12)))], PagedKVCache(plain, 16, 4, torch.float32)
    )[0]
    assert not torch.allclose(unscaled, logits, atol=1e-4)  # the scaling really changed RoPE


def test_unsupported_rope_scaling_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="yarn"):
        yarn = {"rope_type": "yarn", "factor": 2.0}
        LlamaShape.from_hf_config({**tiny_model("llama").config.to_dict(), "rope_scaling": yarn})
