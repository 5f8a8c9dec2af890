"""What each rank of a tensor-parallel test group runs (and, with no group, the TP = 1
reference): a model's shard loaded into a page pool slot, its KV cache over a KV slot, and the
same script of steps on every size. Kept free of transformers and pytest so that spawned ranks
start quickly."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from warmserve.engine.arch import LlamaShape, read_config
from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.lockstep import agree_num_blocks, tp_group
from warmserve.engine.request import SamplingParams
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.tp import TPGroup, shard_plan, shard_shape
from warmserve.hardware import pages_for
from warmserve.worker.layout import checkpoint_files, sharded_layout
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.weights import load_shard_into_slot, slot_view

BLOCK = 4
POISON = 3  # a prompt starting with this token makes the forward fail on the rank told to


@dataclass(frozen=True)
class Case:
    name: str
    model_dir: Path
    page_bytes: int = 64 << 10
    kv_pages: int = 8
    vocab: int = 97
    fail_rank: int | None = None  # the rank whose forward fails on POISON (its own part)
    long_prompt: int = 0  # a prefill this long too: its step header takes two broadcasts


def build(case: Case, tp: TPGroup | None) -> Engine:
    """A rank's engine over its shard in a slot and its KV cache over a KV slot."""
    shape = LlamaShape.from_hf_config(read_config(case.model_dir), case.name)
    shard = shard_plan(shape, 1 if tp is None else tp.size)[0 if tp is None else tp.rank]
    local = shard_shape(shape, shard)
    files = checkpoint_files(case.model_dir)
    _, total = sharded_layout(files, shard, shape)
    weight_pages = pages_for(total, case.page_bytes)
    pool = PagePool(CpuPages(weight_pages + case.kv_pages, case.page_bytes), asynchronous=False)
    params = load_shard_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), files, shard, shape)
    kv = pool.new_slot(PageUse.KV)
    pool.grow(kv, case.kv_pages)
    dtype = params["model.embed_tokens.weight"].dtype  # KV as the weights, as a worker keeps it
    block_bytes = PagedKVCache.block_bytes(local, BLOCK, dtype)
    blocks = case.kv_pages * case.page_bytes // block_bytes  # differs by rank: its KV heads
    if tp is not None:
        blocks = agree_num_blocks(tp, blocks)
    buf = slot_view(pool, kv, case.kv_pages * case.page_bytes)
    cache = PagedKVCache.from_buffer(local, buf, blocks, BLOCK, dtype)
    model = PagedLlama(local, params, name=case.name)
    if tp is not None and case.fail_rank == tp.rank:
        _poison(model, tp.rank)
    sched = Scheduler(BlockAllocator(blocks, BLOCK), max_batched_tokens=12)
    return Engine(model, cache, sched, eos_token_id=None, tp=tp)


def _poison(model: PagedLlama, rank: int) -> None:
    """This rank's forward raises on a step prefilling a POISON prompt, after one of its sums
    (mid-way through the step's collectives)."""
    real = model._layers

    def layers(seqs, cache):
        if any(q.start == 0 and q.token_ids[0] == POISON for q in seqs):
            shape, dtype = model.sum_shapes(sum(len(q.token_ids) for q in seqs))[0]
            model.reduce(torch.zeros(shape, dtype=dtype))
            raise RuntimeError(f"injected failure on rank {rank}")
        return real(seqs, cache)

    model._layers = layers


def script(engine: Engine, case: Case) -> dict:
    """What the leader (or the TP = 1 engine) computes: logits of a prefill and of decode steps
    through scattered blocks, and greedy tokens with log-probabilities of a batch of requests
    (chunked prefill mixed with decodes)."""
    out: dict = {}
    gen = torch.Generator().manual_seed(7)
    ids = [t for t in torch.randint(4, case.vocab, (11,), generator=gen).tolist()]
    table = [9, 2, 7, 0, 5]  # scattered: the cache is really paged
    logits = [engine._forward([SeqInput(ids, 0, table)], None)[0]]
    forced = torch.randint(4, case.vocab, (5,), generator=gen).tolist()
    for tok in forced:  # teacher-forced: every step's logits compared, whatever the argmax
        ids.append(tok)
        logits.append(engine._forward([SeqInput([tok], len(ids) - 1, table)], None)[0])
    out["logits"] = torch.stack(logits)
    if case.long_prompt:
        ids = torch.randint(4, case.vocab, (case.long_prompt,), generator=gen).tolist()
        blocks = list(range(len(table), len(table) + -(-len(ids) // BLOCK)))[::-1]
        out["long"] = engine._forward([SeqInput(ids, 0, blocks)], None)[0]
    prompts = [torch.randint(4, case.vocab, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_tokens=6, logprobs=3)
    rids = [engine.add(p, params) for p in prompts]
    toks: dict[int, list[int]] = {r: [] for r in rids}
    lps: dict[int, list[float]] = {r: [] for r in rids}
    while engine.has_work():
        step = engine.step()
        assert not step.failed, step.failed
        for rid, tok in step.tokens.items():
            toks[rid].append(tok)
            lps[rid].append(step.logprobs[rid].logprob)
    out["tokens"] = [toks[r] for r in rids]
    out["logprobs"] = torch.tensor([lps[r] for r in rids])
    if case.fail_rank is not None:  # a failing step drops its requests; the next one runs
        bad = engine.add([POISON, 5, 6, 7], SamplingParams(max_tokens=2))
        failed = {}
        while engine.has_work():
            failed.update(engine.step().failed)
        out["failed"] = (bad in failed, failed.get(bad, ""))
        out["after"] = engine.generate([prompts[0]], SamplingParams(max_tokens=6))[0]
    return out


def _init(rank: int, size: int, store: str) -> TPGroup:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=60),
    )  # a hang fails the test, late
    return tp_group()


def rank_main(rank: int, size: int, store: str, cases: list[Case], out_dir: str) -> None:
    tp = _init(rank, size, store)
    try:
        for case in cases:
            engine = build(case, tp)
            if tp.is_leader:
                result = script(engine, case)
                engine.stop_followers()
                torch.save(result, os.path.join(out_dir, f"{case.name}.pt"))
            else:
                while engine.follow():
                    pass
    finally:
        dist.destroy_process_group()


def lose_a_follower(rank: int, size: int, store: str, case: Case, out_dir: str) -> None:
    """The follower runs one step and its process ends (as if killed); what the leader's
    next step does, and how long it takes to say so, lands in `lost.pt`."""
    tp = _init(rank, size, store)
    engine = build(case, tp)
    if not tp.is_leader:
        engine.follow()
        os._exit(0)  # no goodbye: the connections just close
    engine.add([5, 6, 7], SamplingParams(max_tokens=4))
    engine.step()  # the prefill, with the follower
    t0 = time.perf_counter()
    try:
        engine.step()
        result = ("no error", "")
    except Exception as e:
        result = (type(e).__name__, str(e))
    torch.save((*result, time.perf_counter() - t0), os.path.join(out_dir, "lost.pt"))
    os._exit(0)  # the group is broken: tearing it down politely could wait on the dead peer
