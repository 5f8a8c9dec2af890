"""The simulator computes exactly what it computed before its speed work (sim_golden.py)."""

import json

import pytest
from sim_golden import GOLDEN, cases, compute_case

CASES = cases()


@pytest.mark.parametrize("case", list(CASES))
def test_runs_match_their_pinned_fingerprints(case):
    pinned = json.loads(GOLDEN.read_text())[case]
    exp, policies = CASES[case]
    got = compute_case(exp, policies)
    assert sorted(got) == sorted(pinned)
    for policy in policies:
        # Summary first: a mismatch there says what moved, the hashes only that something did.
        assert got[policy]["summary"] == pinned[policy]["summary"], policy
        assert got[policy] == pinned[policy], policy
