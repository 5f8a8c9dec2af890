"""`scripts/evaluate.py --rerun` finds the cell every saved row ran on from the row alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load():
    sys.path.insert(0, str(_SCRIPTS))
    spec = importlib.util.spec_from_file_location("evaluate_script", _SCRIPTS / "evaluate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ev = _load()


@pytest.mark.parametrize("quick", [True, False])
def test_every_saved_row_maps_back_to_its_cell(quick):
    fixed = ev.fixed_tasks(quick, [1, 2], None, None)
    assert fixed
    for group, labels, cell, seed, pols, _ in fixed:
        # The labels are all the rerun reads back from a row.
        assert set(labels) <= set(ev.LABEL_KEYS)
        row = {"group": group, **labels, "seed": seed, "policy": pols[0], "ttft_p99_s": 1.0}
        assert ev._cell_of(row, fixed) == cell


def test_a_sweep_row_maps_to_its_sweep_point_and_an_unknown_row_is_refused():
    svc = next(iter(ev.SWEEPS))
    row = {"group": "sweep", "service": svc, "rps": 3.5, "seed": 1, "policy": "warmserve"}
    assert ev._cell_of(row, []) == ev.sweep_cell(svc, 3.5)
    fixed = ev.fixed_tasks(True, [1], None, None)
    with pytest.raises(SystemExit, match="no cell"):
        ev._cell_of({"group": "ablation", "models": 7, "seed": 1, "policy": "x"}, fixed)
