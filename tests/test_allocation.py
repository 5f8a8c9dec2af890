from helpers import instance, model, replica, snapshot

from warmserve.control.allocation import choose_start
from warmserve.control.api import SetKvPages
from warmserve.control.kv_reservation import kv_actions, kv_target_pages
from warmserve.types import StartPath

M7 = model("m", tp=1)
M2 = model("m", tp=2)


def test_finished_prewarm_hit_first():
    snap = snapshot(
        replicas=[replica(0, "m", (3,), ready=False), replica(1, "m", (5,)), replica(2, "x", (5,))]
    )
    c = choose_start(M7, snap, smart=True, use_replicas=True)
    assert (c.gpus, c.path, c.replica_id) == ((5,), StartPath.PREWARM_HIT, 1)
    assert c.evict == (2,)  # the other model sharing GPU 5 becomes KV cache


def test_in_progress_hit_before_a_miss():
    snap = snapshot(replicas=[replica(0, "m", (3,), ready=False)])
    c = choose_start(M7, snap, smart=True, use_replicas=True)
    assert (c.gpus, c.path, c.replica_id) == ((3,), StartPath.INPROGRESS_HIT, 0)


def test_hits_need_free_gpus():
    snap = snapshot(replicas=[replica(0, "m", (3,))], instances=[instance(9, "x", (3,))])
    c = choose_start(M7, snap, smart=True, use_replicas=True)
    assert c.path == StartPath.COLD and c.gpus != (3,)


def test_miss_takes_the_aligned_group_hosting_fewest_replicas():
    snap = snapshot(
        replicas=[
            replica(0, "a", (0,)),
            replica(1, "b", (1,)),
            replica(2, "c", (2, 3)),
            replica(3, "d", (4,)),
        ],
        instances=[instance(9, "x", (6, 7))],
    )
    c = choose_start(M2, snap, smart=True, use_replicas=True)
    assert (c.gpus, c.path, c.evict) == ((4, 5), StartPath.COLD, (3,))


def test_first_fit_without_smart_placement():
    snap = snapshot(replicas=[replica(0, "a", (0,)), replica(1, "b", (1,))])
    c = choose_start(M2, snap, smart=False, use_replicas=True)
    assert c.gpus == (0, 1) and set(c.evict) == {0, 1}


def test_no_room():
    snap = snapshot(num_gpus=2, gpus_per_node=2, instances=[instance(9, "x", (0,))])
    assert choose_start(M2, snap, smart=True, use_replicas=True) is None


def test_kv_target_keeps_a_floor_and_load_proportional_headroom():
    m = model("m", max_len=4096)  # 4 pages per max-length request
    idle = instance(0, "m", (0,), kv=64, used=0)
    assert kv_target_pages(idle, m, in_flight=0, capacity=32, floor_requests=1) == 4
    busy = instance(0, "m", (0,), kv=48, used=10, lent=16)
    # used 10 + 64 * 8/32 headroom
    assert kv_target_pages(busy, m, in_flight=8, capacity=32, floor_requests=1) == 26
    assert kv_target_pages(busy, m, in_flight=40, capacity=32, floor_requests=1) == 64


def test_lend_then_reclaim_evicting_lowest_value_first():
    snap = snapshot(num_gpus=1, gpus_per_node=1, total_pages=100)
    inst = instance(0, "m", (0,), kv=60, used=5)
    assert kv_actions(inst, 40, snap, {}, min_lend_pages=3) == [SetKvPages(0, 40)]
    assert kv_actions(inst, 58, snap, {}, min_lend_pages=3) == []  # below the lending chunk
    # Lent pages hold two prewarmed replicas; load comes back and wants 30 more pages.
    inst = instance(0, "m", (0,), kv=20, used=15, lent=40)
    snap = snapshot(
        num_gpus=1,
        gpus_per_node=1,
        total_pages=100,
        replicas=[replica(1, "a", (0,), pages=15), replica(2, "b", (0,), pages=15)],
        instances=[inst],
    )
    free = snap.gpus[0].free_pages  # 100 - (20 + 10) - 30 = 40
    assert free == 40
    acts = kv_actions(inst, 50, snap, {1: 2.0, 2: 0.5}, min_lend_pages=3)
    assert acts == [SetKvPages(0, 50)]  # fits in free pages: nothing evicted
    acts = kv_actions(inst, 70, snap, {1: 2.0, 2: 0.5}, min_lend_pages=3)
    assert [type(a).__name__ for a in acts] == ["Evict", "SetKvPages"]
    assert acts[0].replica_id == 2 and acts[1] == SetKvPages(0, 70)
