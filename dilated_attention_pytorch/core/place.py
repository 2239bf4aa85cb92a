"""Grouped-head results written into the whole result, region by region: each
branch problem writes every position of its segments for its heads, its own rows
where it selects them and zeros (lse -inf) elsewhere, so the result needs no zero
fill first (:func:`~..pattern.tiles_regions` says when the regions cover it).
One Triton pass per problem on CUDA (:mod:`.place_triton`); torch ops here, the
fallback and the reference."""

from __future__ import annotations

import math

from torch import Tensor

from ..pattern import BranchCall
from . import place_triton
from .views import copy_rows, region, strided


def place_result(
    dest: Tensor,
    dest_lse: Tensor | None,
    call: BranchCall,
    part: Tensor | None,
    part_lse: Tensor | None = None,
    first_head: int = 0,
) -> None:
    """Write ``call``'s region of ``dest`` ``(batch, seq, heads, head_dim)`` (holding
    heads ``first_head ..``) from ``part`` ``(batch, num_segments, length, call heads,
    head_dim)``, zeros where the call selects no row (everywhere when ``part`` is
    None: a problem without queries); ``dest_lse``/``part_lse`` alike, -inf there."""
    to = region(dest, call, first_head)
    to_lse = None if dest_lse is None else region(dest_lse, call, first_head)
    if part is not None and call.length and place_triton.can_place(to, part, call):
        place_triton.place(to, to_lse, call, part, part_lse)
        return
    to.zero_()
    if to_lse is not None:
        to_lse.fill_(-math.inf)
    if part is None or not call.length:
        return
    copy_rows(strided(dest, call, first_head), part)
    if dest_lse is not None and part_lse is not None:
        strided(dest_lse, call, first_head).copy_(part_lse)
