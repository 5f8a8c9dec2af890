"""The node's pre-built TP communicators: aligned groups, built once, and an all-reduce in each."""

import multiprocessing as mp

import pytest

from warmserve.runtime.groups import GroupSpec, aligned_groups, build_groups


def test_aligned_groups_are_the_planners_nested_blocks():
    assert aligned_groups(1, 8) == []
    assert aligned_groups(2, 2) == [(0, 1)]
    assert aligned_groups(4, 4) == [(0, 1), (2, 3), (0, 1, 2, 3)]
    assert aligned_groups(4, 2) == [(0, 1), (2, 3)]  # no larger TP is served
    assert aligned_groups(6, 4) == [(0, 1), (2, 3), (4, 5), (0, 1, 2, 3)]
    groups = aligned_groups(8, 8)
    assert len(groups) == 4 + 2 + 1
    for a in groups:  # laminar: any two are nested or disjoint
        for b in groups:
            sa, sb = set(a), set(b)
            assert not sa & sb or sa <= sb or sb <= sa


def _rank(spec: GroupSpec, out) -> None:
    import torch
    import torch.distributed as dist

    device = "cpu"
    if spec.backend == "nccl":  # one GPU per rank, chosen before the group exists
        torch.cuda.set_device(spec.rank)
        device = f"cuda:{spec.rank}"
    ng = build_groups(spec)
    sums = {}
    for ranks, g in ng.groups.items():
        t = torch.tensor([float(spec.rank + 1)], device=device)
        dist.all_reduce(t, group=g)
        sums[ranks] = t.item()
    out.put((spec.rank, sums, ng.build_s))
    ng.close()


def _needs_gpus(n: int):
    import torch

    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")


@pytest.mark.parametrize(
    ("size", "backend"),
    [(2, "gloo"), (4, "gloo"),
     pytest.param(2, "nccl", marks=[pytest.mark.gpu, _needs_gpus(2)])],
)  # fmt: skip
def test_every_worker_builds_its_groups_once_and_all_reduce_works(tmp_path, size, backend):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(
            target=_rank, args=(GroupSpec(store, r, size, size, 60.0, backend=backend), out)
        )
        for r in range(size)
    ]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, sums, build_s = out.get(timeout=120)
        got[rank] = sums
        assert build_s > 0
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank, sums in got.items():
        mine = [g for g in aligned_groups(size, size) if rank in g]
        assert sorted(sums) == sorted(mine)
        for ranks, total in sums.items():
            assert total == sum(r + 1 for r in ranks)
