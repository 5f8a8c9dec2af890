"""`warmserve bench` prompts: unique per request, seeded, of the trace's length."""

import numpy as np
import pytest

from warmserve.bench import _WORDS, BenchConfig, BenchError, request_prompts
from warmserve.workload.builders import from_trace

BLOCK = 16  # the engine's KV block: a prefix cache shares whole blocks


def workload(n=300, models=("a", "b"), seed=0):
    rng = np.random.default_rng(seed)
    inp = rng.integers(20, 400, size=n)
    names = [models[k % len(models)] for k in range(n)]
    return from_trace(list(models), np.arange(n, dtype=np.float64), names, inp,
                      np.full(n, 8), None)  # fmt: skip


def cfg(**kw):
    return BenchConfig(endpoint="http://x", trace="azure-conv", models=("a", "b"), **kw)


def prefix_cache_hit_rate(prompts):
    """Share of prompt words a block-level prefix cache would find already computed: a block
    hits when the whole prompt up to its end was seen before (in any earlier prompt)."""
    seen, hit, total = set(), 0, 0
    for p in prompts:
        words = tuple(p.split())
        total += len(words)
        for end in range(BLOCK, len(words) + 1, BLOCK):
            key = words[:end]
            if key in seen:
                hit += BLOCK
            seen.add(key)
    return hit / total


def old_prompt(num_tokens, k):
    """The former construction: rotations of one 24-word cycle."""
    old = _WORDS[:24]
    return " ".join(old[(k + j) % 24] for j in range(max(1, num_tokens)))


def test_prompts_are_unique_reproducible_and_of_the_trace_length():
    wl = workload()
    prompts = request_prompts(cfg(), wl, wl.num_requests)
    assert len(set(prompts)) == len(prompts)
    assert [len(p.split()) for p in prompts] == [int(x) for x in wl.input_tokens]
    assert request_prompts(cfg(), wl, wl.num_requests) == prompts  # seeded
    assert request_prompts(cfg(seed=1), wl, wl.num_requests) != prompts
    assert set(" ".join(prompts).split()) <= set(_WORDS)


def test_a_prefix_cache_finds_nothing_to_share():
    wl = workload()
    n = wl.num_requests
    old = [old_prompt(int(wl.input_tokens[k]), k) for k in range(n)]
    # The former prompts: a block-level prefix cache hit a large share of them (the test
    # would catch a return to anything like it).
    assert prefix_cache_hit_rate(old) > 0.25
    assert prefix_cache_hit_rate(request_prompts(cfg(), wl, n)) == 0.0


def test_shared_prefix_workload():
    wl = workload()
    n = wl.num_requests
    prompts = request_prompts(cfg(shared_prefix_tokens=64), wl, n)
    assert len(set(prompts)) == n
    assert [len(p.split()) for p in prompts] == [int(x) for x in wl.input_tokens]
    heads = {}
    for k, p in enumerate(prompts):
        if int(wl.input_tokens[k]) > 64:
            heads.setdefault(int(wl.model_idx[k]), set()).add(" ".join(p.split()[:64]))
    assert all(len(h) == 1 for h in heads.values())  # one prefix per model
    assert heads[0] != heads[1]  # and the models' prefixes differ
    rate = prefix_cache_hit_rate(prompts)
    assert 0.1 < rate < 0.5  # 64 of ~210 tokens, less each model's first prompt
    with pytest.raises(BenchError, match="shared-prefix"):
        cfg(shared_prefix_tokens=-1)


def test_every_word_is_one_token(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(set(_WORDS)) == 256
    for w in _WORDS:
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1, w
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w  # a prompt's first word
    wl = workload(40)
    for p, n in zip(request_prompts(cfg(), wl, 40), wl.input_tokens, strict=True):
        assert len(tok.encode(p, add_special_tokens=False)) == int(n)
