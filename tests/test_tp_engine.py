"""Tensor parallelism: the shard plan, sharded slots, and TP = 2 / 4 ranks (processes over gloo)
computing what TP = 1 computes, logits and greedy tokens, through the paged KV cache."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_architectures import ARCHS, shape_of, tiny
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from warmserve.engine.arch import LlamaShape, UnsupportedModel, read_config
from warmserve.engine.llama import PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.lockstep import _INLINE, decode, encode
from warmserve.engine.tp import TPShard, shard_plan, shard_shape
from warmserve.worker.layout import (
    checkpoint_files,
    shard_weight_pages,
    sharded_layout,
    weight_pages,
    weights_layout,
)
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.weights import load_into_slot, load_shard_into_slot


def _shape(heads: int, kv: int, inter: int = 96, head_dim: int = 8) -> LlamaShape:
    return LlamaShape(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=inter,
                      num_layers=2, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                      rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=True)  # fmt: skip


@st.composite
def _plans(draw):
    kv = draw(st.integers(1, 8))
    heads = kv * draw(st.integers(1, 6))
    inter = draw(st.integers(1, 64))
    size = draw(st.integers(1, min(heads, inter)))
    return _shape(heads, kv, inter), size


@given(_plans())
def test_shard_plan_splits_heads_by_kv_group_and_the_mlp_evenly(case):
    shape, size = case
    plan = shard_plan(shape, size)
    nq, nkv = shape.num_heads, shape.num_kv_heads
    group = nq // nkv
    assert [s.rank for s in plan] == list(range(size)) and {s.size for s in plan} == {size}
    # Every query head owned exactly once, together with its own KV head.
    owned = [h for s in plan for h in s.q_heads]
    assert sorted(owned) == list(range(nq))
    for s in plan:
        assert s.q_heads and list(s.q_heads) == list(range(s.q_heads[0], s.q_heads[-1] + 1))
        assert {h // group for h in s.q_heads} == set(s.kv_heads)
        # Query heads group evenly over the rank's KV heads: the local model is plain GQA.
        assert len(s.q_heads) % len(s.kv_heads) == 0
    kv_owners = [h for s in plan for h in s.kv_heads]
    if size <= nkv:  # whole groups: each KV head on one rank, counts differ by at most one
        assert sorted(kv_owners) == list(range(nkv))
        assert all(len(s.q_heads) == group * len(s.kv_heads) for s in plan)
        counts = [len(s.kv_heads) for s in plan]
    else:  # replicated: one KV head a rank, every KV head on some rank
        assert all(len(s.kv_heads) == 1 for s in plan)
        assert set(kv_owners) == set(range(nkv))
        counts = [kv_owners.count(h) for h in range(nkv)]
    assert max(counts) - min(counts) <= 1
    # The MLP's columns partition the intermediate dimension, in order, as evenly as can be.
    bounds = [s.ffn for s in plan]
    assert bounds[0][0] == 0 and bounds[-1][1] == shape.intermediate_size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    widths = [b - a for a, b in bounds]
    assert min(widths) >= 1 and max(widths) - min(widths) <= 1


def test_shard_plan_smollm2_shape_at_tp2_and_tp4():
    smol = _shape(9, 3, inter=1536, head_dim=64)
    r0, r1 = shard_plan(smol, 2)
    assert (r0.kv_heads, r0.q_heads, r0.ffn) == ((0, 1), tuple(range(6)), (0, 768))
    assert (r1.kv_heads, r1.q_heads, r1.ffn) == ((2,), (6, 7, 8), (768, 1536))
    # TP 4 > 3 KV heads: KV head 0 is replicated on ranks 0 and 1, which split its 3 queries.
    assert [(s.kv_heads, s.q_heads) for s in shard_plan(smol, 4)] == [
        ((0,), (0, 1)), ((0,), (2,)), ((1,), (3, 4, 5)), ((2,), (6, 7, 8))]  # fmt: skip
    local = shard_shape(smol, r1)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (3, 1, 768)


def test_shard_plan_refuses_what_cannot_split():
    with pytest.raises(UnsupportedModel, match="exceeds the number of query heads"):
        shard_plan(_shape(4, 2), 8)
    with pytest.raises(ValueError, match=">= 1"):
        shard_plan(_shape(4, 2), 0)
    with pytest.raises(UnsupportedModel, match="exceeds the MLP"):
        shard_plan(_shape(4, 2, inter=3), 4)


def test_olmo2_shards_know_the_whole_projections_norm_widths():
    olmo = dataclasses.replace(_shape(4, 2), architecture="Olmo2ForCausalLM")
    # TP 4 > 2 KV heads: ranks 0 and 2 count their KV head's squares, 1 and 3 repeat them.
    widths = [shard_shape(olmo, s).full_norm for s in shard_plan(olmo, 4)]
    assert widths == [(32, 16, True), (32, 16, False), (32, 16, True), (32, 16, False)]
    assert all(shard_shape(olmo, s).full_norm[2] for s in shard_plan(olmo, 2))


def _save(kind: str, path, heads: int = 4, kv: int = 2, hidden: int = 64, seed: int = 0):
    cfg = dict(vocab_size=97, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    else:  # Qwen2: biases on q/k/v, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=True))
    model.eval().float().save_pretrained(path)
    return path


@pytest.mark.parametrize("size", [2, 4])
def test_shard_slots_hold_exactly_the_plans_slices(tmp_path, size):
    model_dir = _save("qwen2", tmp_path, heads=6, kv=3, hidden=48)
    files = checkpoint_files(model_dir)
    shape = LlamaShape.from_hf_config(read_config(model_dir))
    pool = PagePool(CpuPages(16, 64 << 10), asynchronous=False)
    full = load_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), files)
    shard_pages = []
    for shard in shard_plan(shape, size):
        params = load_shard_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), files, shard, shape)
        # The shard's tensors are exactly the local model's, cut where the plan says.
        shard_shape(shape, shard).check_tensors("m", {k: t.shape for k, t in params.items()})
        q = slice(shard.q_heads[0] * 8, (shard.q_heads[-1] + 1) * 8)
        kv = slice(shard.kv_heads[0] * 8, (shard.kv_heads[-1] + 1) * 8)
        f = slice(*shard.ffn)
        p = "model.layers.1."
        for name, want in [
            ("self_attn.q_proj.weight", full[p + "self_attn.q_proj.weight"][q]),
            ("self_attn.q_proj.bias", full[p + "self_attn.q_proj.bias"][q]),
            ("self_attn.k_proj.weight", full[p + "self_attn.k_proj.weight"][kv]),
            ("self_attn.v_proj.bias", full[p + "self_attn.v_proj.bias"][kv]),
            ("self_attn.o_proj.weight", full[p + "self_attn.o_proj.weight"][:, q]),
            ("mlp.up_proj.weight", full[p + "mlp.up_proj.weight"][f]),
            ("mlp.down_proj.weight", full[p + "mlp.down_proj.weight"][:, f]),
            ("input_layernorm.weight", full[p + "input_layernorm.weight"]),
        ]:
            assert torch.equal(params[p + name], want), name
        assert torch.equal(params["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
        shard_pages.append(shard_weight_pages(model_dir, pool.page_bytes, shard))
        _layout, total = sharded_layout(files, shard, shape)
        assert total < weights_layout(files)[1]
    pool.check()
    # Together the shards hold more than the model (replicated embeddings), each less.
    assert max(shard_pages) <= weight_pages(model_dir, pool.page_bytes) < sum(shard_pages)


def test_a_tp1_shard_is_the_whole_model(tmp_path):
    model_dir = _save("llama", tmp_path)
    files = checkpoint_files(model_dir)
    shape = LlamaShape.from_hf_config(read_config(model_dir))
    (only,) = shard_plan(shape, 1)
    assert only == TPShard(0, 1, (0, 1), (0, 1, 2, 3), (0, 96))
    assert sharded_layout(files, only, shape) == weights_layout(files)


@given(st.lists(st.tuples(st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
                          st.integers(0, 5000), st.lists(st.integers(0, 999), max_size=30)),
                max_size=6))  # fmt: skip
def test_step_headers_decode_to_the_steps_sequences(raw):
    seqs = [SeqInput(tuple(t), start, tuple(b)) for t, start, b in raw]
    assert decode(encode(seqs)) == seqs


def test_a_long_prefills_header_takes_a_second_broadcast():
    """What the golden tests' 450-token prefill relies on to cover the two-part header."""
    assert len(encode([SeqInput(tuple(range(450)), 0, tuple(range(113)))])) > _INLINE


# ----- TP = 2 and 4 ranks against TP = 1 ------------------------------------------------------
# (name, kind, query heads, KV heads, hidden, extra config): even, uneven and fewer-than-TP KV
# groups, Qwen2's q/k/v biases and Llama's o/down biases (replicated, added once after the sum).
RANDOM = {
    "llama-kv4": ("llama", 8, 4, 64, dict(attention_bias=True, mlp_bias=True)),
    "qwen2-kv3": ("qwen2", 6, 3, 48, {}),
    "llama-kv2": ("llama", 8, 2, 64, {}),
    "qwen2-kv1": ("qwen2", 4, 1, 32, {}),
    "olmo2-kv2": ("olmo2", 4, 2, 32, {}),  # q/k norms over the whole projection: one more sum
}
AT = {
    2: ["llama-kv4", "qwen2-kv3", "smollm2", "llama-kv4-bf16"],
    4: ["llama-kv4", "qwen2-kv3", "llama-kv2", "qwen2-kv1", "olmo2-kv2"],
}
FAIL_RANK = {
    "llama-kv4": 1,
    "qwen2-kv3": 0,
    "olmo2-kv2": 3,
}  # whose forward fails on a poisoned prompt


def _random_dir(root, name, dtype=torch.float32, rounded=False, to=None):
    """A random model saved in `dtype`; `rounded`: its weights rounded to bf16, saved fp32."""
    kind, heads, kv, hidden, extra = RANDOM[name]
    cfg = dict(vocab_size=97, hidden_size=hidden, intermediate_size=90, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.2,
               **extra)  # fmt: skip
    torch.manual_seed(len(name))
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    elif kind == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**cfg))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=True))
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: draw values worth checking
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(std=0.1)
            elif p.ndim == 1:
                p.normal_(mean=1.0, std=0.3)
    model = model.eval().float()
    if rounded:
        model = model.to(torch.bfloat16).float()
    path = root / (to or name)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tp_cases(tmp_path_factory, smollm2_dir):
    from tp_ranks import Case

    root = tmp_path_factory.mktemp("tp-models")
    cases = {n: Case(n, _random_dir(root, n), fail_rank=FAIL_RANK.get(n), long_prompt=450)
             for n in RANDOM}  # fmt: skip
    # bf16, as models are served: the same weights, and those weights exactly in fp32.
    bf16 = _random_dir(root, "llama-kv4", torch.bfloat16, to="llama-kv4-bf16")
    exact = _random_dir(root, "llama-kv4", rounded=True, to="llama-kv4-exact")
    cases["llama-kv4-bf16"] = Case("llama-kv4-bf16", bf16, long_prompt=450)
    cases["llama-kv4-exact"] = Case("llama-kv4-exact", exact, long_prompt=450)
    cases["smollm2"] = Case("smollm2", smollm2_dir, page_bytes=2 << 20, kv_pages=2,
                            vocab=49152)  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def tp1(tp_cases):
    from tp_ranks import build, script

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        return {n: script(build(c, None), c) for n, c in tp_cases.items()}
    finally:
        torch.set_num_threads(threads)


def _spawn(size, cases, tmp_path_factory):
    from tp_ranks import rank_main

    out = tmp_path_factory.mktemp(f"tp{size}")
    store = str(out / "store")
    # Forked, not spawned: a spawned rank imports torch anew (seconds each on a loaded 2-core
    # machine: 26 s for 4 ranks there, against 0.3 s forked); each rank runs one thread.
    torch.multiprocessing.start_processes(rank_main, args=(size, store, cases, str(out)),
                                          nprocs=size, start_method="fork")  # fmt: skip
    return {c.name: torch.load(out / f"{c.name}.pt") for c in cases}


@pytest.fixture(scope="module")
def tp2(tp_cases, tmp_path_factory):
    return _spawn(2, [tp_cases[n] for n in AT[2]], tmp_path_factory)


@pytest.fixture(scope="module")
def tp4(tp_cases, tmp_path_factory):
    return _spawn(4, [tp_cases[n] for n in AT[4]], tmp_path_factory)


def _check(got, want, name):
    # Sums in another order than one device's: fp32 round-off only.
    torch.testing.assert_close(got["logits"], want["logits"], atol=2e-4, rtol=1e-4)
    assert got["tokens"] == want["tokens"]
    if "long" in want:
        torch.testing.assert_close(got["long"], want["long"], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=2e-4, rtol=1e-4)
    if name in FAIL_RANK:
        dropped, why = got["failed"]
        assert dropped and f"failed on TP rank(s) {FAIL_RANK[name]}" in why, why
        assert want["failed"] == (False, "")
        assert got["after"] == want["after"]  # the ranks stayed in step


@pytest.mark.parametrize("name", [n for n in AT[2] if "bf16" not in n])
def test_tp2_logits_and_greedy_tokens_equal_tp1(tp1, tp2, name):
    _check(tp2[name], tp1[name], name)


def test_tp2_in_bf16_errs_no_more_than_bf16_itself(tp1, tp2):
    """bf16 sums of bf16 partials round differently from one device's: measured against the
    same weights in fp32, TP 2's error stays of the size of TP 1's own."""
    exact = tp1["llama-kv4-exact"]
    for key in ("logits", "long"):
        own = (tp1["llama-kv4-bf16"][key].float() - exact[key]).abs().max().item()
        tp = (tp2["llama-kv4-bf16"][key].float() - exact[key]).abs().max().item()
        assert own > 0 and tp <= 2 * own, (key, own, tp)


@pytest.mark.parametrize("name", AT[4])
def test_tp4_logits_and_greedy_tokens_equal_tp1(tp1, tp4, name):
    _check(tp4[name], tp1[name], name)


def test_a_lost_follower_breaks_the_step_with_a_clear_error(tp_cases, tmp_path):
    from tp_ranks import lose_a_follower

    torch.multiprocessing.start_processes(lose_a_follower, nprocs=2, start_method="fork",
        args=(2, str(tmp_path / "store"), tp_cases["qwen2-kv1"], str(tmp_path)))  # fmt: skip
    kind, message, _seconds = torch.load(tmp_path / "lost.pt")
    assert kind == "TPBroken" and "communication failed" in message, (kind, message)
    # Detected from the peer's closed connection, not by waiting out the group's timeout.
    text = message.lower()
    assert "by peer" in text and "timeout" not in text and "timed out" not in text, message


# ----- every architecture's shard math, ranks as threads ------------------------------------
class _ThreadSums:
    """An all-reduce among threads of one process: the shard math of every architecture
    checked without a process group (the lockstep over gloo is tested above)."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.parts: list[torch.Tensor | None] = [None] * size

    def reducer(self, rank: int):
        def reduce(t: torch.Tensor) -> None:
            self.parts[rank] = t
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)  # in rank order, as every rank sees it
            self.barrier.wait()  # every rank has read every part
            t.copy_(total)

        return reduce


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("kind", list(ARCHS))
def test_every_architectures_shards_sum_to_the_whole_model(kind, size, tmp_path):
    model = tiny(kind)
    model.save_pretrained(tmp_path)
    files = checkpoint_files(tmp_path)
    shape = shape_of(model)
    pool = PagePool(CpuPages(64, 64 << 10), asynchronous=False)
    whole = PagedLlama(shape, load_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), files))
    sums = _ThreadSums(size)
    ranks = []
    for shard in shard_plan(shape, size):
        local = shard_shape(shape, shard)
        params = load_shard_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), files, shard, shape)
        ranks.append((PagedLlama(local, params, reduce=sums.reducer(shard.rank)),
                      PagedKVCache(local, 16, 4, torch.float32)))  # fmt: skip
    cache = PagedKVCache(shape, 16, 4, torch.float32)
    table = [11, 3, 7, 0, 14, 5]
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    steps = [[SeqInput(ids, 0, table)]] + [
        [SeqInput([t], len(ids) + i, table)] for i, t in enumerate((5, 17, 42, 8))
    ]
    with ThreadPoolExecutor(size) as ex:
        for seqs in steps:  # a prefill, then decode steps through the paged caches
            futs = [ex.submit(m.forward, seqs, c) for m, c in ranks]
            got = [f.result() for f in futs]
            want = whole.forward(seqs, cache)
            for g in got:  # every rank holds the same logits (the head is replicated)
                torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
