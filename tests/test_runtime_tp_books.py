"""TP instances on the serving runtime's books, under the real controller (hypothesis state
machine over four workers of one node, models at TP 1, 2 and 4).

Workers are modelled by what their commands mean, per rank: after every step the books
balance and agree with the workers, and every start evicts only replicas nested with its
workers (the planner's laminar groups: inside the group, or a larger group enclosing it), so
a start never cuts through the prewarm of a group it does not cover.

Not "only replicas inside it": a TP 2 replica that the planner nested inside a TP 4 replica's
workers evicts that TP 4 replica when it is activated (the worker's KV takes every page not
serving), as `control/placement.py`'s rule allows.
"""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from warmserve.control.api import Evict, RequestInfo, ServedModel, StartInstance
from warmserve.control.config import ControlConfig
from warmserve.control.forecaster import Forecaster, SlotHistory, cycle_slots
from warmserve.control.registry import POLICIES
from warmserve.runtime import messages as m
from warmserve.runtime.cluster import ModelFiles, RuntimeCluster
from warmserve.types import ModelName, StartPath

WORKERS = 4
MODELS = {"a": (1, 30), "b": (2, 25), "c": (4, 20)}  # name: (tp, pages per worker)
TOTAL = 100


class FakeWorker:
    def __init__(self) -> None:
        self.resident: dict[str, tuple[int, int]] = {}  # name: (rank, tp) of its shard
        self.serving: str | None = None
        self.kv = 0
        self.resizes = 0  # of the instance it serves
        self.pending: list[m.Command] = []

    def run(self, cmd: m.Command) -> None:
        if isinstance(cmd, m.LoadModel):
            assert cmd.name not in self.resident
            assert cmd.tp_size == MODELS[cmd.name][0]
            self.resident[cmd.name] = (cmd.tp_rank, cmd.tp_size)
        elif isinstance(cmd, m.UnloadModel):
            assert cmd.name in self.resident and cmd.name != self.serving
            del self.resident[cmd.name]
        elif isinstance(cmd, m.Activate):
            assert self.serving is None
            tp = MODELS[cmd.name][0]
            assert len(cmd.group) == (tp if tp > 1 else 0)
            shard = (cmd.rank, tp)
            assert self.resident.get(cmd.name, shard) == shard, "another rank's shard"
            self.resident = {cmd.name: shard}  # loads it if cold; evicts the others
            self.serving, self.resizes = cmd.name, 0
            free = TOTAL - MODELS[cmd.name][1]
            self.kv = free if cmd.kv_pages is None else min(free, cmd.kv_pages)
        elif isinstance(cmd, m.Deactivate):
            assert self.serving is not None
            if not cmd.keep_weights:
                del self.resident[self.serving]
            self.serving, self.kv = None, 0
        elif isinstance(cmd, m.MapKvPages):
            assert self.serving is not None and cmd.pages >= 1
            self.kv = cmd.pages
        elif isinstance(cmd, m.AddRequest | m.AbortRequest):
            assert self.serving is not None
        used = sum(MODELS[n][1] for n in self.resident) + self.kv
        assert used <= TOTAL, "pages over-committed"


class TpBooks(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.workers = [FakeWorker() for _ in range(WORKERS)]
        self.instance_of: dict[int, int] = {}
        self.next_rid = 0
        self.tp_starts = 0
        files = {n: ModelFiles(n, f"/models/{n}", p, tp) for n, (tp, p) in MODELS.items()}
        served = [ServedModel(ModelName(n), tp, p, p << 21, 1e4, 2048)
                  for n, (tp, p) in MODELS.items()]  # fmt: skip
        self.cluster = RuntimeCluster(WORKERS, files, self.send, self.dispatched)
        apply = self.cluster.apply
        self.cluster.apply = lambda actions: (self.check_start(actions), apply(actions))[1]
        cfg = ControlConfig(capacity_per_instance=2, scale_window_s=1.0, protect_period_s=1.0)
        fc = Forecaster(cfg.forecast_window_s, cfg.forecast_correction_points)
        for n in MODELS:  # load everywhere in history: the planner prewarms every model
            hist = SlotHistory.empty(cycle_slots("day", cfg.forecast_window_s))
            hist.avg[:], hist.peak[:], hist.count[:] = 0.5, 1.5, 1
            fc.add_model(n, 0.0, hist)
        self.ctl = POLICIES["warmserve"].build(cfg, served, fc)
        for w in range(WORKERS):
            self.cluster.worker_ready(w, TOTAL)

    def check_start(self, actions) -> None:
        """The invariant, on the live books just before the batch is applied: a start evicts
        only replicas nested with its group (inside it, or enclosing it), never one that
        crosses its edge, whose prewarm on workers outside the group would be lost for a
        group the start does not even cover."""
        starts = [a for a in actions if isinstance(a, StartInstance)]
        evicted = [self.cluster.replicas[a.replica_id] for a in actions if isinstance(a, Evict)]
        for s in starts:
            group = set(s.gpus)
            self.tp_starts += len(group) > 1
            for rep in evicted:
                devs = set(rep.devices)
                if not devs & group:
                    continue
                assert devs <= group or group <= devs, (
                    f"a start on {s.gpus} evicts replica {rep.replica_id} of {rep.model} on "
                    f"{rep.devices}, which crosses its group"
                )
                INSIDE.append(devs <= group)

    def send(self, wid: int, cmd: m.Command) -> None:
        if not isinstance(cmd, m.GroupKv):  # news between ranks; the fakes need none
            self.workers[wid].pending.append(cmd)

    def dispatched(self, rid: int, inst: int) -> None:
        self.instance_of[rid] = inst

    @rule(model=st.sampled_from(sorted(MODELS)))
    def request(self, model: str) -> None:
        rid = self.next_rid
        self.next_rid += 1
        self.ctl.on_request(self.now, RequestInfo(rid, ModelName(model), self.now, 10, 10),
                            self.cluster)  # fmt: skip

    @precondition(lambda self: self.instance_of)
    @rule(data=st.data())
    def finish(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.instance_of)))
        inst = self.instance_of.pop(rid)
        self.deliver()
        self.cluster.request_done(rid, inst)
        self.ctl.on_request_done(self.now, rid, self.cluster)

    @rule(dt=st.floats(0.1, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.ctl.tick(self.now, self.cluster)

    @rule()
    def deliver(self) -> None:
        for wid, w in enumerate(self.workers):
            while w.pending:
                cmd = w.pending.pop(0)
                w.run(cmd)
                if isinstance(cmd, m.LoadModel):
                    self.cluster.mark_loaded(wid, cmd.token)
                elif isinstance(cmd, m.Activate):
                    self.cluster.mark_running(wid, 64, 1 << 21, cmd.instance_id)
                elif isinstance(cmd, m.MapKvPages):
                    inst = self.cluster.devices[wid].instance_id
                    if inst is not None:
                        w.resizes += 1
                        self.cluster.kv_mapped(wid, inst, w.resizes)

    @invariant()
    def books_balance(self) -> None:
        self.cluster.check()

    @invariant()
    def books_match_every_rank_once_they_catch_up(self) -> None:
        if any(w.pending for w in self.workers):
            return
        for wid, w in enumerate(self.workers):
            reps = {r.model: (r.devices.index(wid), len(r.devices))
                    for r in self.cluster.replicas.values() if wid in r.devices}  # fmt: skip
            inst_id = self.cluster.devices[wid].instance_id
            inst = self.cluster.instances.get(inst_id) if inst_id is not None else None
            assert w.serving == (inst.model if inst else None)
            if inst is not None:
                reps[inst.model] = (inst.devices.index(wid), len(inst.devices))
                assert w.kv == inst.kv_pages
            assert w.resident == reps, (wid, w.resident, reps)

    def teardown(self) -> None:
        STARTS.append(self.tp_starts)


STARTS: list[int] = []
INSIDE: list[bool] = []  # per eviction by a start: the replica lay inside the group
TestTpBooks = TpBooks.TestCase
TestTpBooks.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_the_machine_starts_tp_instances_that_evict():
    TestTpBooks().runTest()
    assert sum(STARTS) > 0  # TP 2 and TP 4 instances did start
    assert any(INSIDE)  # and some start evicted replicas inside its group


def test_workers_are_numbered_node_by_node_and_tp_ranks_are_node_local():
    """Ray runs `workers.count` workers on every node: the books place them on their nodes,
    so a TP group never spans two, and an `Activate` names node-local ranks."""
    files = {"b": ModelFiles("b", "/models/b", 25, 2)}
    sent: list[tuple[int, m.Command]] = []
    cluster = RuntimeCluster(4, files, lambda w, c: sent.append((w, c)), lambda r, i: None,
                             workers_per_node=2)  # fmt: skip
    for w in range(4):
        cluster.worker_ready(w, TOTAL)
    assert [g.node_id for g in cluster.snapshot().gpus] == [0, 0, 1, 1]
    cluster.apply([StartInstance(0, ModelName("b"), (2, 3), StartPath.COLD, None)])
    acts = [(w, c) for w, c in sent if isinstance(c, m.Activate)]
    assert [(w, c.group, c.rank) for w, c in acts] == [(2, (0, 1), 0), (3, (0, 1), 1)]
    assert cluster.mark_running(3, 64, 1 << 21, 0) is None  # the leader's engine is not up
    assert cluster.mark_running(2, 64, 1 << 21, 0) is not None
