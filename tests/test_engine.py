"""The engine loop against transformers' own greedy generation, with continuous batching."""

import pytest
import torch
from test_engine_golden import tiny_model

from warmserve.engine.engine import Engine, sample
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama
from warmserve.engine.request import Request, SamplingParams
from warmserve.engine.scheduler import Scheduler


def make_engine(model, num_blocks=64, block_size=4, budget=64):
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    cache = PagedKVCache(shape, num_blocks, block_size, torch.float32)
    sched = Scheduler(BlockAllocator(num_blocks, block_size), max_batched_tokens=budget)
    return Engine(PagedLlama(shape, model.state_dict()), cache, sched, eos_token_id=None)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 9, 2, 44, 17], list(range(30, 52)), [3], [70, 71, 72, 73, 74, 75, 76, 77, 78]]


def test_continuous_batching_gives_transformers_greedy_tokens():
    model = tiny_model("llama")
    want = [hf_greedy(model, p, 12) for p in PROMPTS]
    engine = make_engine(model)
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=12)) == want


def test_chunked_prefill_and_preemption_keep_outputs():
    model = tiny_model("llama")
    want = [hf_greedy(model, p, 12) for p in PROMPTS]
    # A 7-token budget chunks the 22-token prompt; 12 blocks of 4 cannot hold all four at once,
    # so requests are preempted and recomputed.
    engine = make_engine(model, num_blocks=12, budget=7)
    preempted = []
    orig = engine.scheduler.schedule

    def spy():
        out = orig()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = spy
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=12)) == want
    assert preempted, "the test meant to force preemption"
    engine.scheduler.alloc.check()
    assert engine.scheduler.alloc.num_free == 12


def test_stop_tokens_max_tokens_and_abort_free_blocks():
    model = tiny_model("llama")
    engine = make_engine(model)
    first = hf_greedy(model, PROMPTS[0], 6)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, stop_token_ids=(first[2],)))
    assert out == [first[:3]]
    rid = engine.add(PROMPTS[1], SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    assert not engine.scheduler.has_work() and engine.scheduler.alloc.num_free == 64


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    p = SamplingParams(temperature=1.0, top_k=2, seed=3)
    draws = [sample(logits, p, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in (1, 2)
    many = {sample(logits, p, g) for g in [torch.Generator().manual_seed(s) for s in range(40)]}
    assert many == {1, 2}  # never outside the top 2
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(20)} == {1}


def test_scheduler_rejects_requests_larger_than_the_cache():
    sched = Scheduler(BlockAllocator(4, 4))
    with pytest.raises(ValueError, match="needs 5 blocks"):
        sched.add(Request(0, list(range(10)), SamplingParams(max_tokens=10)))
    assert not sched.has_work()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),  # logits / T overflowed to inf
        SamplingParams(temperature=1e-38, seed=1),
        SamplingParams(temperature=1.0, top_p=5e-324, seed=2),  # kept no token at all
        SamplingParams(temperature=1.0, top_p=1e-50, top_k=3, seed=3),
    ],
)
def test_extreme_sampling_parameters_sample_the_most_likely_token(params):
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 1e4 / 3])
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    assert sample(logits, params, gen) == 4


def test_sampling_parameters_are_checked_where_they_are_made():
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")},
                {"top_p": float("nan")}, {"seed": 2**63}, {"seed": -(2**63) - 1},
                {"logprobs": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-(2**63))


def test_one_requests_sampling_failure_drops_it_alone(monkeypatch):
    """A request whose sampling raises is reported failed; the others finish exactly."""
    import warmserve.engine.engine as engine_mod

    model = tiny_model("llama")
    want = [hf_greedy(model, p, 6) for p in PROMPTS]
    engine = make_engine(model)
    real = engine_mod.sample

    def sample_or_fail(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_mod, "sample", sample_or_fail)
    good = [engine.add(p, SamplingParams(max_tokens=6)) for p in PROMPTS]
    bad = engine.add(PROMPTS[0], SamplingParams(max_tokens=6, temperature=1.0, seed=666))
    outputs, failed = {}, {}
    while engine.scheduler.has_work():
        step = engine.step()
        failed.update(step.failed)
        for req in step.finished_requests:
            outputs[req.request_id] = req.output_ids
    assert set(failed) == {bad} and "RuntimeError" in failed[bad]
    assert [outputs[r] for r in good] == want
    assert engine.scheduler.alloc.num_used == 0 and not engine._gens


def test_a_failed_forward_drops_its_step_and_the_engine_serves_on(monkeypatch):
    model = tiny_model("llama")
    want = hf_greedy(model, PROMPTS[1], 5)
    engine = make_engine(model)
    first = [engine.add(p, SamplingParams(max_tokens=5)) for p in PROMPTS[:2]]
    real = engine.model.forward

    def boom(seqs, cache):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", boom)
    step = engine.step()
    assert set(step.failed) == set(first) and not step.tokens
    assert not engine.scheduler.has_work() and engine.scheduler.alloc.num_used == 0
    monkeypatch.setattr(engine.model, "forward", real)
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=5)) == [want]


def test_engine_takes_the_callers_ids_and_reports_logprobs():
    model = tiny_model("llama")
    engine = make_engine(model)
    rid = engine.add(PROMPTS[0], SamplingParams(max_tokens=3, logprobs=2), request_id=1234)
    assert rid == 1234
    with pytest.raises(ValueError, match="already"):
        engine.add(PROMPTS[0], SamplingParams(), request_id=1234)
    # A seed torch cannot take leaves nothing behind (it used to leave a ghost request).
    huge = SamplingParams(seed=1)
    object.__setattr__(huge, "seed", 2**70)  # past the edge's validation
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        engine.add(PROMPTS[1], huge, request_id=7)
    assert set(engine.scheduler.requests) == {1234}
    step = engine.step()
    lp = step.logprobs[1234]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1], -1)
    assert step.tokens[1234] == int(ref.argmax())
    assert lp.logprob == pytest.approx(float(ref.max()), abs=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(2).indices.tolist()


def test_prompt_logprobs_match_transformers_with_chunks_and_preemption():
    model = tiny_model("llama")
    # A 7-token budget chunks the 22-token prompt; 12 blocks force preemption and recompute.
    engine = make_engine(model, num_blocks=12, budget=7)
    params = SamplingParams(max_tokens=6, prompt_logprobs=2)
    ids = [engine.add(p, params) for p in PROMPTS]
    got: dict[int, tuple] = {}
    while engine.scheduler.has_work():
        step = engine.step()
        for rid, lps in step.prompt_logprobs.items():
            assert rid not in got  # delivered once, with the first token
            got[rid] = lps
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
        lps = got[rid]
        assert len(lps) == len(prompt) - 1
        for pos, lp in enumerate(lps, start=1):
            assert lp.logprob == pytest.approx(float(ref[pos - 1, prompt[pos]]), abs=1e-4)
            assert [t for t, _ in lp.top] == ref[pos - 1].topk(2).indices.tolist()
