"""The serving runtime's books under the real controller (hypothesis state machine).

Workers are modelled by what their commands mean (resident weights, the serving model, the
requests they hold); after every step the books balance, agree with those workers, and every
dispatched request sits on a worker serving its model.
"""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from warmserve.control.api import ReleaseInstance, RequestInfo, ServedModel, StartInstance
from warmserve.control.config import ControlConfig
from warmserve.control.forecaster import Forecaster, SlotHistory, cycle_slots
from warmserve.control.registry import POLICIES
from warmserve.runtime import messages as m
from warmserve.runtime.cluster import ModelFiles, RuntimeCluster
from warmserve.types import InstanceState, ModelName, StartPath

PAGES = {"a": 30, "b": 30, "c": 45}
TOTAL = 100


class FakeWorker:
    def __init__(self) -> None:
        self.resident: set[str] = set()
        self.serving: str | None = None
        self.requests: set[int] = set()
        self.kv = 0  # pages mapped in the KV slot
        self.pending: list[m.Command] = []

    def run(self, cmd: m.Command) -> None:
        self._run(cmd)
        assert sum(PAGES[n] for n in self.resident) + self.kv <= TOTAL, "pages over-committed"

    def _run(self, cmd: m.Command) -> None:
        if isinstance(cmd, m.LoadModel):
            assert cmd.name not in self.resident
            self.resident.add(cmd.name)
        elif isinstance(cmd, m.UnloadModel):
            assert cmd.name in self.resident and cmd.name != self.serving
            self.resident.remove(cmd.name)
        elif isinstance(cmd, m.Activate):
            assert self.serving is None
            self.resident = {cmd.name}  # loads it if cold; evicts the others
            self.serving = cmd.name
            self.kv = TOTAL - PAGES[cmd.name]  # KV over every free page
        elif isinstance(cmd, m.Deactivate):
            assert self.serving is not None and not self.requests
            if not cmd.keep_weights:
                self.resident.discard(self.serving)
            self.serving = None
            self.kv = 0
        elif isinstance(cmd, m.MapKvPages):
            assert self.serving is not None and cmd.pages >= 1
            self.kv = cmd.pages
        elif isinstance(cmd, m.AddRequest):
            assert self.serving is not None
            self.requests.add(cmd.request_id)
        elif isinstance(cmd, m.AbortRequest):
            self.requests.discard(cmd.request_id)


class RuntimeBooks(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.workers = [FakeWorker(), FakeWorker()]
        self.model_of: dict[int, str] = {}
        self.instance_of: dict[int, int] = {}
        self.next_rid = 0
        self.prewarms = 0
        self.lends = 0
        self.setup(self.policy)

    def setup(self, policy: str) -> None:
        files = {n: ModelFiles(n, f"/models/{n}", p) for n, p in PAGES.items()}
        served = [ServedModel(ModelName(n), 1, p, p << 21, 1e4, 2048) for n, p in PAGES.items()]
        self.cluster = RuntimeCluster(2, files, self.send, self.dispatched)
        cfg = ControlConfig(capacity_per_instance=2, scale_window_s=1.0, protect_period_s=1.0)
        fc = Forecaster(cfg.forecast_window_s, cfg.forecast_correction_points)
        for n in PAGES:  # history with load everywhere: the planner prewarms
            hist = SlotHistory.empty(cycle_slots("day", cfg.forecast_window_s))
            hist.avg[:], hist.peak[:], hist.count[:] = 0.5, 1.5, 1
            fc.add_model(n, 0.0, hist)
        self.ctl = POLICIES[policy].build(cfg, served, fc)
        for w in range(2):
            self.cluster.worker_ready(w, TOTAL)

    def send(self, wid: int, cmd: m.Command) -> None:
        self.prewarms += isinstance(cmd, m.LoadModel)
        self.lends += isinstance(cmd, m.MapKvPages)
        self.workers[wid].pending.append(cmd)

    def dispatched(self, rid: int, inst: int) -> None:
        self.instance_of[rid] = inst

    # ----- rules ------------------------------------------------------------------------
    @rule(model=st.sampled_from(sorted(PAGES)))
    def request(self, model: str) -> None:
        rid = self.next_rid
        self.next_rid += 1
        self.model_of[rid] = model
        self.ctl.on_request(self.now, RequestInfo(rid, ModelName(model), self.now, 10, 10),
                            self.cluster)  # fmt: skip

    @precondition(lambda self: self.instance_of)
    @rule(data=st.data())
    def finish(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.instance_of)))
        inst = self.instance_of.pop(rid)
        self.deliver()
        for w in self.workers:
            w.requests.discard(rid)
        self.cluster.request_done(rid, inst)
        self.ctl.on_request_done(self.now, rid, self.cluster)

    @rule(dt=st.floats(0.1, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.ctl.tick(self.now, self.cluster)

    @rule()
    def deliver(self) -> None:
        """Workers run their queued commands in order and report back."""
        for wid, w in enumerate(self.workers):
            while w.pending:
                cmd = w.pending.pop(0)
                w.run(cmd)
                if isinstance(cmd, m.LoadModel):
                    self.cluster.mark_loaded(wid, cmd.token)
                elif isinstance(cmd, m.Activate):
                    self.cluster.mark_running(wid, 64, 1 << 21)

    @rule(wid=st.sampled_from([0, 1]))
    def kill(self, wid: int) -> None:
        self.workers[wid] = FakeWorker()
        lost = self.cluster.worker_lost(wid)
        if lost is not None:
            for rid in self.ctl.on_instance_failed(self.now, lost, self.cluster):
                del self.instance_of[rid]
                info = RequestInfo(rid, ModelName(self.model_of[rid]), self.now, 10, 10)
                self.ctl.on_request(self.now, info, self.cluster)  # retried elsewhere
        self.cluster.worker_ready(wid, TOTAL)
        self.ctl.tick(self.now, self.cluster)

    # ----- invariants -------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        self.cluster.check()

    @invariant()
    def books_match_the_workers_once_they_catch_up(self) -> None:
        if any(w.pending for w in self.workers):
            return
        for wid, w in enumerate(self.workers):
            dev = self.cluster.devices[wid]
            reps = {r.model for r in self.cluster.replicas.values() if r.devices == (wid,)}
            inst = self.cluster.instances.get(dev.instance_id) if dev.instance_id is not None \
                else None  # fmt: skip
            serving = inst.model if inst else None
            assert w.serving == serving
            expect = reps | ({serving} if serving else set())
            assert w.resident == expect, (wid, w.resident, expect)
            if inst is not None:
                assert inst.state == InstanceState.RUNNING or inst.requests
                assert w.kv == inst.kv_pages

    @invariant()
    def dispatched_requests_sit_on_their_model(self) -> None:
        for rid, inst_id in self.instance_of.items():
            inst = self.cluster.instances[inst_id]
            assert inst.model == self.model_of[rid] and rid in inst.requests


class WarmServeBooks(RuntimeBooks):
    policy = "warmserve"

    def teardown(self) -> None:
        PREWARMS.append(self.prewarms)
        LENDS.append(self.lends)


class VanillaBooks(RuntimeBooks):
    policy = "vanilla-autoscale"


PREWARMS: list[int] = []
LENDS: list[int] = []
SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestWarmServeBooks = WarmServeBooks.TestCase
TestWarmServeBooks.settings = SETTINGS
TestVanillaBooks = VanillaBooks.TestCase
TestVanillaBooks.settings = SETTINGS


def test_the_machine_exercises_prewarming_and_kv_lending():
    TestWarmServeBooks().runTest()
    assert sum(PREWARMS) > 0  # the planner's Prewarm path ran, not only cold starts
    assert sum(LENDS) > 0  # and KV pages were lent or reclaimed


def test_the_runtime_never_stops_a_starting_instance():
    # The simulator's regression (`test_a_starting_instance_is_never_stopped`) on the
    # runtime's books: an instance still starting is the least loaded one when the load falls.
    files = {"a": ModelFiles("a", "/models/a", 30)}
    sent: list[tuple[int, m.Command]] = []
    cluster = RuntimeCluster(2, files, lambda w, c: sent.append((w, c)), lambda r, i: None)
    for w in range(2):
        cluster.worker_ready(w, TOTAL)
    cfg = ControlConfig(capacity_per_instance=8, scale_window_s=1.0, protect_period_s=1.0)
    served = [ServedModel(ModelName("a"), 1, 30, 30 << 21, 1e4, 2048)]
    ctl = POLICIES["vanilla-autoscale"].build(cfg, served, Forecaster(cfg.forecast_window_s, 3))
    for rid in range(8):  # the first instance, full
        ctl.on_request(0.0, RequestInfo(rid, ModelName("a"), 0.0, 10, 10), cluster)
    cluster.mark_running(0, 64, 1 << 21)
    ctl.on_request(0.0, RequestInfo(8, ModelName("a"), 0.0, 10, 10), cluster)  # overflows
    (second,) = [i for i in cluster.instances.values() if i.devices == (1,)]
    for rid in range(5):  # three requests stay on the first instance, one on the second
        cluster.request_done(rid, 0)
        ctl.on_request_done(0.1, rid, cluster)
    for t in range(1, 20):  # load 4 < half of two instances' capacity: one must go
        ctl.tick(float(t), cluster)
        assert second.state == InstanceState.STARTING
        assert second.instance_id in cluster.instances
    assert cluster.instances[0].state == InstanceState.STOPPING  # the running one drains
    assert not any(isinstance(c, m.Deactivate) for w, c in sent if w == 1)


def test_a_late_activated_never_marks_the_next_instance_on_its_worker_running():
    """The worker echoes the instance id it activated: an `Activated` that arrives after its
    instance was released (and another started on the same worker) is not taken for the new
    one, which would otherwise be dispatched to before its engine exists."""
    files = {"a": ModelFiles("a", "/models/a", 30), "b": ModelFiles("b", "/models/b", 30)}
    sent: list[tuple[int, m.Command]] = []
    cluster = RuntimeCluster(1, files, lambda w, c: sent.append((w, c)), lambda r, i: None)
    cluster.worker_ready(0, TOTAL)
    cluster.apply([StartInstance(0, ModelName("a"), (0,), StartPath.COLD, None)])
    cluster.mark_running(0, 64, 1 << 21, instance_id=0)
    cluster.apply([ReleaseInstance(0, None)])
    cluster.apply([StartInstance(1, ModelName("b"), (0,), StartPath.COLD, None)])
    activates = [c for _, c in sent if isinstance(c, m.Activate)]
    assert [c.instance_id for c in activates] == [0, 1]
    assert cluster.mark_running(0, 64, 1 << 21, instance_id=0) is None  # instance 0's echo
    assert cluster.instances[1].state == InstanceState.STARTING
    assert cluster.mark_running(0, 64, 1 << 21, instance_id=1) is not None
    assert cluster.instances[1].state == InstanceState.RUNNING
