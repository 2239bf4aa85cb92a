"""exchange="all_gather" on spawned gloo groups of 2 to 8 ranks (3, 5, 6 included, with
partial segments spanning ranks): exact against the reference, fused and gather paths."""

import pytest

from .cases import WORLDS, check_strategy


# worlds of 5, 6 and 8 slow processes on CI's two cores: the slow set
@pytest.mark.parametrize("world", [pytest.param(w, marks=pytest.mark.slow) if w > 2 else w for w in WORLDS])
def test_all_gather_matches_reference(world, tmp_path):
    check_strategy([("fused", "all_gather"), ("gather", "all_gather")], world, tmp_path)
