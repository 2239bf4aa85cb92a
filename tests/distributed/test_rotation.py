"""exchange="ring" (rotation) on spawned gloo groups of 2 to 8 ranks: exact against the
reference on the fused path."""

from __future__ import annotations

import functools

import pytest

from .cases import CASES, run_cases
from .spawn import spawn

EXCHANGES = [("fused", "ring")]
WORLDS = sorted({case[0] for case in CASES})


@pytest.mark.parametrize("world", WORLDS)
def test_rotation_matches_reference(world, tmp_path):
    results = spawn(functools.partial(run_cases, exchanges=EXCHANGES), world, tmp_path)
    assert sorted(results) == list(range(world))
    assert all(not failures for failures in results.values()), results
