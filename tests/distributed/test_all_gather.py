"""exchange="all_gather" on spawned gloo groups of 2 to 8 ranks (3, 5, 6 included, with
partial segments spanning ranks): exact against the reference, fused and gather paths."""

from __future__ import annotations

import functools

import pytest

from .cases import CASES, run_cases
from .spawn import spawn

EXCHANGES = [("fused", "all_gather"), ("gather", "all_gather")]
WORLDS = sorted({case[0] for case in CASES})


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_matches_reference(world, tmp_path):
    results = spawn(functools.partial(run_cases, exchanges=EXCHANGES), world, tmp_path)
    assert sorted(results) == list(range(world))
    assert all(not failures for failures in results.values()), results
