"""The KV lend/reclaim relay between the ranks of a TP instance (`worker_main._Loop._set_kv`):
a follower unmaps pages only after the leader stopped handing out their blocks, and the leader
uses reclaimed pages only after every follower mapped them back, counted per resize, so a
lend followed at once by a reclaim cannot slip past the gate."""

from multiprocessing import Pipe

from warmserve.runtime import messages as m
from warmserve.runtime.worker_main import _Loop, _TpRole


class FakeWorker:
    def __init__(self, pages: int) -> None:
        self.kv_pages = pages
        self.engine = object()

    def lend_kv(self, pages: int) -> bool:
        self.kv_pages -= pages
        return True

    def reclaim_kv(self, pages: int) -> None:
        self.kv_pages += pages


def _rank(rank: int) -> tuple[_Loop, object]:
    here, there = Pipe()
    loop = _Loop(here, FakeWorker(300))
    loop.tp = _TpRole(7, rank, 2, [0, 0])
    return loop, there


def _sent(conn) -> list:
    out = []
    while conn.poll():
        out.append(conn.recv())
    return out


def test_a_follower_lends_only_after_the_leader_and_the_leader_reclaims_only_after_it():
    leader, lconn = _rank(0)
    follower, fconn = _rank(1)
    # Both get: lend down to 100, then reclaim up to 300 (the controller's quick turnaround).
    assert not follower._set_kv(100)  # the leader has not lent yet
    assert follower.worker.kv_pages == 300
    assert leader._set_kv(100)
    assert _sent(lconn) == [m.KvMapped(7, 1)]
    assert not leader._set_kv(300)  # the follower still holds (and maps) the old pages
    follower.tp.done = [1, 0]  # GroupKv relayed by the runtime
    assert follower._set_kv(100) and follower.worker.kv_pages == 100
    assert follower._set_kv(300) and follower.worker.kv_pages == 300
    assert _sent(fconn) == [m.KvMapped(7, 1), m.KvMapped(7, 2)]
    leader.tp.done = [1, 2]
    assert leader._set_kv(300) and leader.worker.kv_pages == 300


def test_a_follower_behind_a_quick_lend_and_reclaim_of_the_leader_is_not_stuck():
    """The leader finished its lend and its reclaim before the follower heard of either. It
    is back at 300 pages, so comparing page counts would hold the follower's lend forever;
    counting resizes lets it go ahead (the leader's first resize is done), then reclaim."""
    follower, _ = _rank(1)
    follower.tp.done = [2, 0]
    assert follower._set_kv(100)
    assert follower._set_kv(300)
    assert follower.tp.done == [2, 2]


def test_a_waiting_resize_is_dropped_when_the_instance_is_going_away():
    """The runtime relays nothing for a released instance: a follower's lend still waiting
    for the leader must not wedge its queue in front of the `Deactivate`."""
    follower, _ = _rank(1)
    follower.pending.append(m.MapKvPages(100))
    assert follower._drain_commands() and len(follower.pending) == 1  # waits for the leader
    follower.pending.append(m.Deactivate(keep_weights=True))
    follower.worker.deactivate = lambda keep: None
    follower.tp.follow = None
    follower.engine = None
    follower._drain_commands()
    assert not follower.pending and follower.tp is None
    assert follower.worker.kv_pages == 300  # never unmapped ahead of the leader
