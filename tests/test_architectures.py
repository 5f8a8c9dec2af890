"""Golden tests of every architecture the engine runs, against transformers at fp32.

Tiny random models built with transformers' own config classes. Every 1-D parameter (norms,
biases) is re-drawn at random: freshly initialised they are all ones or zeros, which would hide
a norm or bias applied wrongly (Gemma's (1 + w), say). Small sliding windows (5-6 tokens)
against blocks of 4 make windowed layers matter within a dozen tokens.
"""

import functools

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from warmserve.engine import cpu_linear
from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.request import SamplingParams
from warmserve.engine.scheduler import Scheduler
from warmserve.worker.layout import checkpoint_files
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.weights import load_into_slot

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

ARCHS = {
    # Llama with every bias it can have (q/k/v/o and the MLP's).
    "llama-bias": lambda: LlamaForCausalLM(
        LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, head_dim=16, sliding_window=5)),
    # Qwen2: q/k/v biases; sliding windows from layer 1 on (max_window_layers).
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            **TINY,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            tie_word_embeddings=True,
        )
    ),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True)),
    # Gemma 3: sliding and full layers with their own RoPE bases (the full ones scaled), a
    # query scale that is not head_dim's.
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
        )
    ),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**TINY, sliding_window=6)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**TINY)),
}


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHS[kind]().eval().float()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if kind == "gemma3" else 1.0))
    return model


def shape_of(model: torch.nn.Module) -> LlamaShape:
    return LlamaShape.from_hf_config(model.config.to_dict(), "tiny")


def ours(model, tmp_path, weights: str, num_blocks: int = 16, block_size: int = 4):
    shape = shape_of(model)
    if weights == "separate":
        engine = PagedLlama(shape, model.state_dict())
    else:  # in a pool slot as a worker holds them: fusable projections side by side
        if weights == "packed" and not cpu_linear.available():
            pytest.skip("no C compiler for the CPU linear kernel")
        model.save_pretrained(tmp_path)
        pool = PagePool(CpuPages(4), asynchronous=False)
        slot = pool.new_slot(PageUse.WEIGHTS)
        pack = weights == "packed"  # projections of whole 32-output tiles packed, others plain
        rule = functools.partial(cpu_linear.packable, tied=shape.tie_word_embeddings)
        params = load_into_slot(pool, slot, checkpoint_files(tmp_path), pack=rule if pack else None)
        engine = PagedLlama(shape, params, fuse=True)
        if pack:
            assert any(cpu_linear.is_packed(t) for t in params.values())
        else:
            assert engine.fused_layers == shape.num_layers
    return engine, PagedKVCache(shape, num_blocks, block_size, torch.float32)


def hf_last(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_each_architecture_turns_on_what_it_differs_by():
    """The tiny models exercise the differences they are here for (else a test passes on
    Llama's path alone)."""
    s = {k: shape_of(tiny(k)) for k in ARCHS}
    assert s["llama-bias"].attention_bias and s["llama-bias"].mlp_bias
    assert s["mistral"].windows == (5, 5, 5) and s["phi3"].windows == (6, 6, 6)
    assert s["qwen2"].windows == (None, 5, 5) and s["qwen2"].qkv_bias
    assert s["qwen3"].variant.qk_norm == "head" and s["olmo2"].variant.qk_norm == "full"
    g = s["gemma3"]
    assert g.windows == (5, None, 5) and g.local_rope_theta == 10000.0
    assert g.rope_theta == 1e6 and g.rope_scaling is not None and g.query_scale == 24**-0.5
    assert g.activation == "gelu_pytorch_tanh" and g.variant.norms == "sandwich"


@pytest.mark.parametrize("weights", ["separate", "slot", "packed"])
@pytest.mark.parametrize("kind", list(ARCHS))
def test_prefill_and_stepwise_decode_match_transformers(kind, weights, tmp_path):
    model = tiny(kind)
    engine, cache = ours(model, tmp_path, weights)
    table = [11, 3, 7, 0, 14, 5]  # scattered blocks: the cache is really paged
    ids = torch.randint(3, 97, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = engine.forward([SeqInput(ids, 0, table)], cache)[0]
    close(logits, hf_last(model, ids))
    for _ in range(8):  # greedy decode one token a step, past the windows and block edges
        nxt = int(logits.argmax())
        assert nxt == int(hf_last(model, ids).argmax())
        ids.append(nxt)
        logits = engine.forward([SeqInput([nxt], len(ids) - 1, table)], cache)[0]
        close(logits, hf_last(model, ids))


@pytest.mark.parametrize("weights", ["separate", "packed"])
@pytest.mark.parametrize("kind", list(ARCHS))
def test_chunked_prefill_and_mixed_batches_match_transformers(kind, weights, tmp_path):
    model = tiny(kind)
    engine, cache = ours(model, tmp_path, weights, num_blocks=32)
    ids = list(range(3, 20))
    table = [4, 9, 1, 12, 30]
    engine.forward([SeqInput(ids[:5], 0, table)], cache)
    engine.forward([SeqInput(ids[5:12], 5, table)], cache)  # a chunk longer than a window
    # One step: the chunked sequence's last chunk beside another's whole prompt and a decode.
    b, c = [50, 51, 52, 53, 54, 55, 56, 57], [60, 61, 62]
    tb, tc = [20, 2, 25], [18, 6]
    engine.forward([SeqInput(c, 0, tc)], cache)
    out = engine.forward(
        [SeqInput(ids[12:], 12, table), SeqInput(b, 0, tb), SeqInput([70], 3, tc)], cache
    )
    close(out[0], hf_last(model, ids))
    close(out[1], hf_last(model, b))
    close(out[2], hf_last(model, [*c, 70]))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", list(ARCHS))
def test_engine_with_chunked_prefill_and_preemption_gives_transformers_tokens(kind):
    model = tiny(kind)
    prompts = [[5, 9, 20, 44, 17], list(range(30, 52)), [3], [70, 71, 72, 73, 74, 75, 76, 77]]
    want = [hf_greedy(model, p, 10) for p in prompts]
    shape = shape_of(model)
    # A 7-token budget chunks the long prompt; 12 blocks of 4 cannot hold all four requests,
    # so some are preempted and recomputed.
    sched = Scheduler(BlockAllocator(12, 4), max_batched_tokens=7)
    cache = PagedKVCache(shape, 12, 4, torch.float32)
    engine = Engine(PagedLlama(shape, model.state_dict()), cache, sched, eos_token_id=None)
    preempted = []
    orig = sched.schedule

    def spy():
        out = orig()
        preempted.extend(out.preempted)
        return out

    sched.schedule = spy
    assert engine.generate(prompts, SamplingParams(max_tokens=10)) == want
    assert preempted, "the test meant to force preemption"
    assert sched.alloc.num_free == 12


@pytest.mark.parametrize("kind", list(ARCHS))
def test_bf16_runs_in_bf16_and_stays_near_transformers(kind):
    """bf16 rounds differently in each kernel, so only near (a few bf16 steps of 0.4-1.0
    logits), but every architecture must keep bf16 through (no silent fp32 promotion)."""
    model = tiny(kind).to(torch.bfloat16)
    shape = shape_of(model)
    cache = PagedKVCache(shape, 16, 4, torch.bfloat16)
    ids = list(range(3, 40))
    logits = PagedLlama(shape, model.state_dict()).forward([SeqInput(ids, 0, list(range(12)))],
                                                           cache)[0]  # fmt: skip
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), hf_last(model, ids).float(), atol=2e-2, rtol=0)
