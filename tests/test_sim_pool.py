import dataclasses
import json

import pytest
from sim_golden import cases

from warmserve.sim.pool import CellError, run_cells
from warmserve.sim.runner import make_workload, run_policy


def simulate(policy: str) -> str:
    """One cell: a policy on the small pinned experiment, cut to one minute."""
    exp, _ = cases()["small"]
    exp = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, duration_s=60))
    return json.dumps(run_policy(exp, policy, make_workload(exp)).summary, sort_keys=True)


def fail_on_b(cell: str) -> str:
    if cell == "b":
        raise ValueError("no b")
    return cell


def test_cells_in_workers_equal_cells_inline_in_order():
    cells = ["warmserve", "vanilla-autoscale"]
    seen = []
    pooled = run_cells(simulate, cells, workers=2, progress=lambda d, t: seen.append((d, t)))
    assert pooled == run_cells(simulate, cells, workers=1)
    assert pooled[0] != pooled[1]  # two different runs, each in its place
    assert seen == [(1, 2), (2, 2)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_cell_is_named(workers):
    with pytest.raises(CellError, match=r"cell 1 \('b'\) failed: no b"):
        run_cells(fail_on_b, ["a", "b", "c"], workers=workers)


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_cells(fail_on_b, ["a"], workers=0)
