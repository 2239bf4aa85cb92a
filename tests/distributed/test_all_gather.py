"""exchange="all_gather" on spawned gloo groups of 2 to 8 ranks (3, 5, 6 included, with
partial segments spanning ranks): exact against the reference, fused and gather paths."""

import pytest

from .cases import WORLDS, check_strategy


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_matches_reference(world, tmp_path):
    check_strategy([("fused", "all_gather"), ("gather", "all_gather")], world, tmp_path)
