from pathlib import Path

from helpers import model, snapshot
from test_sim import small_experiment

from warmserve.control.muxserve import plan_meshes
from warmserve.experiment import parse_experiment
from warmserve.sim.runner import make_workload, run_policy


def test_every_model_gets_a_unit_then_spare_groups_go_to_the_busiest():
    models = [model("a", tp=1, pages=30), model("b", tp=1, pages=30), model("c", tp=2, pages=30)]
    snap = snapshot(num_gpus=4, gpus_per_node=4, total_pages=100)
    meshes = plan_meshes(snap, models, {"a": 50.0, "b": 1.0, "c": 5.0}, capacity=32)
    placed = sorted((m.gpus, tuple(m.models)) for m in meshes)
    # c (biggest demand: load x size) takes an aligned pair; a needs 2 units; b shares a GPU.
    assert ((2, 3), ("c",)) in placed
    units = [n for m in meshes for n in m.models]
    assert units.count("a") == 2 and units.count("b") == 1 and units.count("c") == 1
    assert any(len(m.models) == 2 for m in meshes)  # co-location when GPUs run out
    for m in meshes:
        assert len(set(m.models)) == len(m.models)


def test_models_that_cannot_fit_are_left_out():
    models = [model("big", tp=1, pages=90), model("big2", tp=1, pages=90)]
    snap = snapshot(num_gpus=1, gpus_per_node=1, total_pages=100)
    meshes = plan_meshes(snap, models, {"big": 1.0, "big2": 1.0}, capacity=32)
    assert [m.models for m in meshes] == [["big"]]  # no room to co-locate the second


def test_colocation_slows_each_models_steps():
    raw = small_experiment(rps=6.0, duration_s=300)
    raw["cluster"]["gpus_per_node"] = 2  # 2 GPUs for three models: a-0 and a-1 must share
    raw["models"] = [
        {"name": "a", "preset": "llama-2-7b", "tp": 1, "copies": 3, "max_model_len": 2048}
    ]
    exp = parse_experiment(raw, Path())
    wl = make_workload(exp)
    mux = run_policy(exp, "muxserve", wl, check_invariants=True)
    assert mux.summary["failed"] == 0
    # Static KV split: two instances' KV on one GPU, all pages accounted for.
    shared_gpu_kv = mux.memory.kv[-1]
    assert shared_gpu_kv.min() > 0
    raw["cluster"]["gpus_per_node"] = 4  # room for a dedicated GPU each
    alone = run_policy(parse_experiment(raw, Path()), "muxserve", wl)
    # Sharing time stretches decode steps: higher TPOT than with dedicated GPUs.
    assert mux.summary["tpot_mean_s"] > 1.2 * alone.summary["tpot_mean_s"]


def test_muxserve_never_scales():
    exp = parse_experiment(small_experiment(), Path())
    r = run_policy(exp, "muxserve", make_workload(exp), check_invariants=True)
    starts = r.summary["cold_starts"]
    assert starts >= 3 and r.summary["failed"] == 0
    # Memory layout is fixed once the set-up period is over.
    after = r.memory.time_s >= 0
    assert (r.memory.weights[after] == r.memory.weights[after][0]).all()
