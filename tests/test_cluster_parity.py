"""The simulator and the serving runtime keep the same books: one action script, one snapshot.

Hypothesis writes a script of control-plane actions (prewarms, evictions, starts on every
path, dispatches, drains, releases, KV lending and reclaiming), a few actions per step, each
valid for the books at that point. Both clusters apply every step; then the simulator runs
its loads and starts to completion, the runtime's fake workers run their commands and echo
the events back, requests the simulator finished are reported to the runtime, and the two
snapshots must be equal.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from warmserve.cluster.books import Books
from warmserve.control.api import (
    Action,
    Dispatch,
    Evict,
    Prewarm,
    ReleaseInstance,
    SetKvPages,
    StartInstance,
    StopInstance,
)
from warmserve.experiment import parse_experiment
from warmserve.runtime import messages as m
from warmserve.runtime.cluster import ModelFiles, RuntimeCluster
from warmserve.sim.cluster import SimCluster
from warmserve.sim.instance import SimRequest
from warmserve.sim.loop import EventLoop
from warmserve.sim.runner import build_models
from warmserve.types import InstanceState, ModelName, StartPath

NUM_GPUS = 2
SETTLE_S = 60.0  # longer than any load, attach or cold start here; long requests still run

EXP = parse_experiment(
    {
        "name": "parity",
        "seed": 1,
        "cluster": {"nodes": 1, "gpus_per_node": NUM_GPUS, "gpu": "H100-SXM-80G"},
        "models": [{"name": "m", "preset": "llama-2-7b", "tp": 1, "copies": 3}],
        "workload": {"trace": "azure-conv", "rps": 1.0, "duration_s": 60},
        "policies": ["warmserve"],
    },
    Path(),
)
MODELS = build_models(EXP)
NAMES = sorted(MODELS)


class Parity(RuleBasedStateMachine):
    unified = True  # a cold start loads into a slot (its weights stay when it stops)

    def __init__(self) -> None:
        super().__init__()
        self.loop = EventLoop()
        self.finished: list[int] = []
        self.sim = SimCluster(
            self.loop,
            1,
            NUM_GPUS,
            EXP.pool_pages,
            MODELS,
            EXP.costs,
            None,
            lambda rid, t: None,
            lambda rid, t: self.finished.append(rid),
        )
        files = {n: ModelFiles(n, f"/models/{n}", MODELS[n].served.pages_per_gpu) for n in NAMES}
        self.pipes: list[list[m.Command]] = [[] for _ in range(NUM_GPUS)]
        self.rt = RuntimeCluster(NUM_GPUS, files, self._send, lambda rid, inst: None)
        for w in range(NUM_GPUS):
            self.rt.worker_ready(w, EXP.pool_pages)
        self.request_instance: dict[int, int] = {}
        self.next_instance = self.next_replica = self.next_request = 0

    def _send(self, wid: int, cmd: m.Command) -> None:
        self.pipes[wid].append(cmd)

    @property
    def books(self) -> Books:
        return self.sim.books

    # ----- the script -------------------------------------------------------------------
    @rule(data=st.data(), n=st.integers(1, 3))
    def step(self, data: st.DataObject, n: int) -> None:
        for _ in range(n):
            options = self._options()
            action = data.draw(st.sampled_from(options)) if options else None
            if action is None:
                continue
            if isinstance(action, Dispatch):
                req = SimRequest(action.request_id, 64, data.draw(st.integers(1, 20000)))
                self.sim.requests[req.request_id] = req
                self.request_instance[req.request_id] = action.instance_id
                self.next_request += 1
            elif isinstance(action, StartInstance):
                self.next_instance += 1
            elif isinstance(action, Prewarm):
                self.next_replica += 1
            self.sim.apply([action])
            self.rt.apply([action])
        self._settle()

    def _options(self) -> list[Action]:
        """One candidate of every kind of action the books allow now."""
        b = self.books
        out: list[Action] = []
        for d in b.devices:
            on_d = {r.model for r in b.replicas.values() if d.device_id in r.devices}
            for name in NAMES:
                pages = b.weight_pages[name]
                fits = d.free_pages >= pages
                if name not in on_d and fits:
                    out.append(Prewarm(self.next_replica, ModelName(name), (d.device_id,)))
                if not d.instance_ids and name not in on_d and fits:
                    new = -(self.next_instance + 1) if self.unified else None
                    out.append(
                        StartInstance(
                            self.next_instance,
                            ModelName(name),
                            (d.device_id,),
                            StartPath.COLD,
                            None,
                            new_replica_id=new,
                        )
                    )
        for r in b.replicas.values():
            if r.owner is not None:
                continue
            out.append(Evict(r.replica_id))
            if not any(b.devices[g].instance_ids for g in r.devices):
                path = StartPath.PREWARM_HIT if r.is_ready else StartPath.INPROGRESS_HIT
                start = StartInstance(self.next_instance, r.model, r.devices, path, r.replica_id)
                out.append(start)
        for inst in b.instances.values():
            if inst.state != InstanceState.STOPPING:
                out.append(Dispatch(self.next_request, inst.instance_id))
            if inst.state == InstanceState.STARTING:
                pass  # the controller never stops a starting instance (its load is in flight)
            elif not inst.requests:  # weights in a slot stay, under the controller's id rule
                kept = None if inst.replica_id is None else -(inst.instance_id + 1)
                out.append(ReleaseInstance(inst.instance_id, kept))
            elif inst.state == InstanceState.RUNNING:
                out.append(StopInstance(inst.instance_id))
            floor = max(1, inst.kv_used_pages)
            if inst.kv_pages > floor:
                out.append(SetKvPages(inst.instance_id, (inst.kv_pages + floor) // 2))
            free = min(b.devices[g].free_pages for g in inst.devices)
            if inst.kv_lent_pages and free:
                grant = min(inst.kv_lent_pages, free)
                out.append(SetKvPages(inst.instance_id, inst.kv_pages + grant))
        return out

    # ----- after every step: loads finish, workers echo -----------------------------------
    def _settle(self) -> None:
        self.loop.run(self.loop.now() + SETTLE_S)
        for wid, pipe in enumerate(self.pipes):
            while pipe:
                cmd = pipe.pop(0)
                if isinstance(cmd, m.LoadModel):
                    self.rt.mark_loaded(wid, cmd.token)
                elif isinstance(cmd, m.Activate):
                    self.rt.mark_running(wid, 1024, self.rt.page_bytes)
        for rid in self.finished:
            self.rt.request_done(rid, self.request_instance.pop(rid))
        self.finished.clear()
        for inst in self.books.instances.values():  # the engines report their KV use
            (wid,) = inst.devices
            self.rt.mark_kv_used(wid, inst.kv_used_pages)

    @invariant()
    def same_snapshots(self) -> None:
        self.sim.check_invariants()
        self.rt.check()
        assert self.sim.snapshot() == self.rt.snapshot()
        for handle in (self.sim, self.rt):  # the narrow reads say what the snapshot says
            snap = handle.snapshot()
            assert handle.instance_views() == snap.instances
            gpus = tuple(g.gpu_id for g in snap.gpus)
            assert handle.free_pages(gpus) == [g.free_pages for g in snap.gpus]
            assert handle.page_bytes == snap.page_bytes
            assert handle.snapshot() is snap  # reading them built nothing new


class ParityKeepingWeights(Parity):
    unified = True


class ParityOwnWeights(Parity):
    unified = False


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestParityKeepingWeights = ParityKeepingWeights.TestCase
TestParityKeepingWeights.settings = SETTINGS
TestParityOwnWeights = ParityOwnWeights.TestCase
TestParityOwnWeights.settings = SETTINGS


def test_the_issue_example_renames_the_same_way_in_both():
    # Cold start, stop, a hit on the demoted replica, stop: the weights end as replica -2 in
    # both drivers (the runtime used to keep -1, its rename being conditional).
    p = Parity()
    a = ModelName(NAMES[0])
    for actions in (
        [StartInstance(0, a, (0,), StartPath.COLD, None, new_replica_id=-1)],
        [ReleaseInstance(0, -1)],
        [StartInstance(1, a, (0,), StartPath.PREWARM_HIT, -1)],
        [ReleaseInstance(1, -2)],
    ):
        p.sim.apply(actions)
        p.rt.apply(actions)
        p._settle()
        p.same_snapshots()
    (replica,) = p.rt.snapshot().replicas
    assert (replica.replica_id, replica.is_ready) == (-2, True)
