"""Worker operations end to end on CPU: prewarm several models, activate, serve, switch."""

import pytest
from test_engine import PROMPTS, hf_greedy
from test_engine_golden import tiny_model

from warmserve.engine.llama import PagedLlama
from warmserve.engine.request import SamplingParams
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.worker import UniversalWorker


@pytest.fixture
def models(tmp_path):
    out = {}
    for kind in ("llama", "qwen2"):
        model = tiny_model(kind)
        model.save_pretrained(tmp_path / kind)
        out[kind] = (model, tmp_path / kind)
    return out


def in_slot(tensor, slot, pool):
    lo = slot.addr
    hi = lo + len(slot.pages) * pool.page_bytes
    return lo <= tensor.data_ptr() < hi


def test_prewarm_activate_serve_deactivate_switch(models, make_pages):
    pool = PagePool(make_pages(8))  # 8 pages of 2 MiB
    worker = UniversalWorker(pool, block_size=8)
    (llama, llama_dir), (qwen, qwen_dir) = models["llama"], models["qwen2"]
    worker.prewarm("a", llama_dir)
    worker.prewarm("b", qwen_dir)
    pool.check()
    st = worker.status()
    assert st.prewarmed == ("a", "b") and st.pages == {"free": 6, "weights": 2, "kv": 0, "lent": 0}
    a = worker.resident["a"]
    assert all(in_slot(t, a.slot, pool) for t in a.params.values())  # weights live in the slot

    engine = worker.activate("a")  # b is evicted: its page becomes a's KV, no copy
    pool.check()
    st = worker.status()
    assert (
        st.serving == "a" and st.prewarmed == () and st.pages["kv"] == 7 and st.pages["free"] == 0
    )
    assert in_slot(engine.cache.k, worker._kv_slot, pool)
    # The slot layout puts each layer's Q/K/V and gate/up side by side, so they can run as
    # fused matmuls over views of the slot (the default on a GPU).
    res = worker.resident["a"]
    assert PagedLlama(res.shape, res.params, fuse=True).fused_layers == res.shape.num_layers
    params = SamplingParams(max_tokens=8)
    assert engine.generate(PROMPTS, params) == [hf_greedy(llama, p, 8) for p in PROMPTS]

    worker.deactivate()  # KV dropped, weights stay prewarmed
    pool.check()
    assert worker.status().prewarmed == ("a",) and worker.status().pages["free"] == 7
    worker.prewarm("b", qwen_dir)
    engine = worker.activate("b")
    pool.check()
    res = worker.resident["b"]  # Qwen2: the biases sit side by side too
    assert PagedLlama(res.shape, res.params, fuse=True).fused_layers == res.shape.num_layers
    assert engine.generate(PROMPTS, params) == [hf_greedy(qwen, p, 8) for p in PROMPTS]
    assert sum(worker.status().pages.values()) == 8
    pool.close()


def test_background_prewarm_overlaps_serving_and_evict_cancels(models, make_pages):
    pool = PagePool(make_pages(8))
    worker = UniversalWorker(pool, block_size=8)
    (llama, llama_dir), (_, qwen_dir) = models["llama"], models["qwen2"]
    worker.prewarm("a", llama_dir)
    engine = worker.activate("a")
    worker.deactivate()  # a stays prewarmed; 7 free pages
    engine = worker.activate("a")
    worker.deactivate()
    fut = worker.prewarm("b", qwen_dir, background=True)
    # The serving engine keeps going while b loads on the loader thread.
    engine = worker.activate("a")  # waits for b's load, then evicts b (its page becomes KV)
    assert fut.done() and "b" not in worker.resident
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=4)) == [
        hf_greedy(llama, p, 4) for p in PROMPTS
    ]
    worker.deactivate()
    # A load evicted while in flight is cancelled between tensors and frees its pages.
    fut = worker.prewarm("b", qwen_dir, background=True)
    worker.evict("b")
    worker.wait_loads()
    pool.drain()
    pool.check()
    assert "b" not in worker.resident and worker.status().loading == ()
    assert worker.status().pages["weights"] == 1 and worker.status().pages["free"] == 7
    with pytest.raises(Exception, match="already resident"):
        worker.prewarm("a", llama_dir)
    worker.close()
    pool.close()


def test_lend_kv_pages_to_a_prewarm_then_reclaim_them_while_serving(models, make_pages):
    pool = PagePool(make_pages(12))
    worker = UniversalWorker(pool, block_size=8)
    (llama, llama_dir), (_, qwen_dir) = models["llama"], models["qwen2"]
    worker.prewarm("a", llama_dir)
    engine = worker.activate("a")
    alloc = engine.scheduler.alloc
    full_blocks = alloc.num_blocks
    want = [hf_greedy(llama, p, 6) for p in PROMPTS]
    # A running sequence's blocks sit at the low end, so the tail can be lent meanwhile.
    engine.add(PROMPTS[0], SamplingParams(max_tokens=6))
    engine.step()
    held = next(iter(engine.scheduler.requests.values())).block_table
    assert held and max(held) < 4  # blocks are handed out lowest first
    assert worker.lend_kv(10)  # the held blocks sit on the first page: lent at once
    while engine.scheduler.has_work():
        engine.step()
    pool.check()
    assert pool.counts()[PageUse.LENT] == 10 and worker.kv_pages == 1
    assert alloc.num_blocks < full_blocks
    # A prewarm borrows the lent pages; the shrunken instance still serves exactly.
    worker.prewarm("b", qwen_dir)
    b_bytes = sum(t.numel() * t.element_size() for t in worker.resident["b"].params.values())
    pool.check()
    assert pool.counts()[PageUse.WEIGHTS] == 2 and pool.counts()[PageUse.LENT] == 9
    assert engine.generate(PROMPTS[:1], SamplingParams(max_tokens=6)) == want[:1]
    # Reclaim: the borrower goes first, then the pages map back and the blocks return.
    worker.evict("b")
    worker.reclaim_kv(10)
    pool.check()
    assert worker.kv_pages == 11 and alloc.num_blocks == full_blocks
    assert pool.counts()[PageUse.LENT] == 0
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=6)) == want
    a_bytes = sum(t.numel() * t.element_size() for t in worker.resident["a"].params.values())
    assert pool.bytes_copied == a_bytes + b_bytes  # lending and reclaiming copied nothing
    worker.close()
    pool.close()


def test_lend_waits_while_tail_blocks_are_held(models, make_pages):
    pool = PagePool(make_pages(6))
    worker = UniversalWorker(pool, block_size=8)
    _, llama_dir = models["llama"]
    worker.prewarm("a", llama_dir)
    engine = worker.activate("a")
    alloc = engine.scheduler.alloc
    blocks = alloc.allocate(alloc.num_blocks)  # every block held, the tail included
    assert not worker.lend_kv(2)  # the tail's blocks leave use but are still held
    assert alloc.num_free == 0 and pool.counts()[PageUse.LENT] == 0
    alloc.free(blocks)
    assert worker.lend_kv(2)
    pool.check()
    assert pool.counts()[PageUse.LENT] == 2
    alloc.check()
    worker.close()
    pool.close()
