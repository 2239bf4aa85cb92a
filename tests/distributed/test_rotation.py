"""exchange="ring" (rotation) on spawned gloo groups of 2 to 8 ranks: exact against the
reference on the fused path."""

import pytest

from .cases import WORLDS, check_strategy


# the rotation shares the geometry with all_gather (tested at every world there)
@pytest.mark.parametrize(
    "world", [pytest.param(w, marks=pytest.mark.slow) if w > 2 else w for w in WORLDS if w in (2, 3, 4, 8)]
)
def test_rotation_matches_reference(world, tmp_path):
    check_strategy([("fused", "ring")], world, tmp_path)
