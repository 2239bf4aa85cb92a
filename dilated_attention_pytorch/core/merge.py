"""The lse merge of partial attention results (docs/semantics.md, "Merge"): all at
once, online, and every "all"-mode branch from compact rows in one pass (Triton
on CUDA, :mod:`.merge_triton`; torch ops here, the fallback and the reference)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._cache import BoundedCache
from .._checks import accumulation_dtype
from ..pattern import BranchRows
from . import merge_triton


def merge_by_lse(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial attention results of disjoint key sets (docs/semantics.md, "Merge").

    ``outs[i]``: ``(..., head_dim)``, ``lses[i]``: ``(...)``. Returns the merged
    output (float32, or float64 for float64 lse) and lse; where every lse is
    -inf the output is 0 and the lse -inf. Weighted relative to the largest lse
    (``exp(lse_i - max) / sum_j exp(lse_j - max)``), never through the merged
    lse: at large scores a float32 lse cannot hold ``log(branches)`` and the
    weights would not sum to 1. Differentiable, NaN-free gradients.
    """
    lse = torch.stack(list(lses))
    top = lse.amax(0, keepdim=True).detach()  # the result does not depend on it
    has_key = top > -math.inf
    top = torch.where(has_key, top, 0.0)
    weights = torch.exp(lse - top)
    total = weights.sum(0, keepdim=True)
    norm = torch.where(has_key, total, 1.0)
    out = ((weights / norm)[..., None] * torch.stack(list(outs)).to(weights.dtype)).sum(0)
    return out, torch.where(has_key, top + torch.log(norm), -math.inf).squeeze(0)


def merge_online(acc: Tensor, top: Tensor, total: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """One more term of an lse merge, in place on (strided) views: ``acc`` holds
    the outputs weighted by ``exp(lse - top)``, ``top`` the largest lse so far,
    ``total`` the sum of the weights (start: 0, -inf, 0; end: :func:`merge_finish`).
    Unnormalised, so no rounded lse enters a weight (see :func:`merge_by_lse`)."""
    new_top = torch.maximum(top, part_lse)
    safe = torch.where(new_top == -math.inf, 0.0, new_top)
    rescale, weight = torch.exp(top - safe), torch.exp(part_lse - safe)
    acc.mul_(rescale[..., None]).add_(part_out * weight[..., None])
    total.mul_(rescale).add_(weight)
    top.copy_(new_top)


def merge_finish(acc: Tensor, top: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of an online merge; 0 and -inf where no term had a key."""
    has_key = total > 0
    norm = torch.where(has_key, total, 1.0)
    return acc / norm[..., None], torch.where(has_key, top + torch.log(norm), -math.inf)


def merge_into(
    out5: Tensor, top4: Tensor, total4: Tensor, part_out: Tensor, part_lse: Tensor, rows: Tensor | None = None
) -> None:
    """:func:`merge_online` (one fused pass on CUDA with Triton, torch ops elsewhere)
    of 5-D views ``(batch, segments, length, heads, head_dim)`` (lse: without
    head_dim). ``rows``: distinct int64 indices into ``length``; the parts then
    have one row per index, merged into that row of the accumulators."""
    if merge_triton.can_merge(out5, part_out):
        merge_triton.merge_into(out5, top4, total4, part_out, part_lse, rows)
        return
    part_out, part_lse = part_out.to(out5.dtype), part_lse.to(top4.dtype)
    if rows is None:
        merge_online(out5, top4, total4, part_out, part_lse)
        return
    acc, top, total = (x.index_select(2, rows) for x in (out5, top4, total4))
    merge_online(acc, top, total, part_out, part_lse)
    for dest, merged in zip((out5, top4, total4), (acc, top, total)):
        dest.index_copy_(2, rows, merged)


def add_at_rows(dest: Tensor, rows: Tensor, part: Tensor) -> None:
    """``dest[rows[i]] += part[i]`` (``rows`` distinct int64), summed in ``dest``'s
    dtype: one fused pass on CUDA with Triton, ``index_add_`` of a converted copy elsewhere."""
    if merge_triton.can_add_at_rows(dest, part):
        merge_triton.add_at_rows(dest, rows, part)
        return
    dest.index_add_(0, rows, part.to(dest.dtype))


class BranchBuffers:
    """Every branch's compact rows (:class:`~.pattern.BranchRows`) in one
    allocation: branch ``i`` is a ``(batch, num_rows, heads[, head_dim])`` block.
    Never zero-filled: merges read only the rows that hold a result.

    ``adopted`` (:func:`~.pattern.whole_branch`): a branch with no block here;
    :meth:`adopt` gives it one problem's result, which the merge reads in place."""

    def __init__(
        self,
        rows: dict[int, BranchRows],
        batch: int,
        heads: int,
        head_dim: int | None,
        dtype: torch.dtype,
        device: torch.device,
        adopted: int | None = None,
    ) -> None:
        per_unit = 1 if head_dim is None else head_dim
        tail = (heads,) if head_dim is None else (heads, head_dim)
        units = [0 if branch == adopted else batch * br.num_rows * heads for branch, br in rows.items()]
        self.flat = torch.empty(sum(units) * per_unit, dtype=dtype, device=device)
        self.blocks: dict[int, Tensor] = {}
        meta, base = [], 0
        for (branch, br), size in zip(rows.items(), units):
            if branch != adopted:
                block = self.flat[base * per_unit : (base + size) * per_unit]
                self.blocks[branch] = block.view(batch, br.num_rows, *tail)
            meta.append((br.segment_length, br.dilation, br.rows_per_segment, base, size // batch))
            base += size
        self.meta = tuple(meta)
        #: (branches, heads of the whole layer): each head's offset, the pattern's rule as data
        self.offsets = tuple(br.offsets for br in rows.values())
        self.adopted = adopted
        self.adopted_index = None if adopted is None else list(rows).index(adopted)
        #: the adopted branch's rows, ``(batch, segments, rows_per_segment, heads[, head_dim])``
        self.adopted_block: Tensor | None = None

    def adopt(self, block: Tensor) -> None:
        """The adopted branch's result ``(batch, segments, rows_per_segment, heads[,
        head_dim])`` (any strides), read where its compact rows would be."""
        self.adopted_block = block

    def adopted_rows(self) -> Tensor:
        """The adopted branch's result as given to :meth:`adopt`."""
        if self.adopted_block is None:
            raise RuntimeError("the adopted branch's result was never given (BranchBuffers.adopt)")
        return self.adopted_block

    def block(self, branch: int) -> Tensor:
        """Branch ``branch``'s rows as ``(batch, num_rows, heads[, head_dim])`` (the
        adopted one reshaped: a copy unless its strides allow a view)."""
        return self.adopted_rows().flatten(1, 2) if branch == self.adopted else self.blocks[branch]


_BRANCH_META: BoundedCache[tuple[Tensor, Tensor]] = BoundedCache(256)


def _branch_meta(parts: BranchBuffers, device: torch.device) -> tuple[Tensor, Tensor]:
    """``parts``' layout and head offsets on ``device``, made once per layout (no
    host-to-device copy per call)."""

    def build() -> tuple[Tensor, Tensor]:
        meta = torch.tensor(parts.meta, dtype=torch.int64, device=device)
        return meta, torch.tensor(parts.offsets, dtype=torch.int32, device=device)

    return _BRANCH_META.get((parts.meta, parts.offsets, device), build)


#: distinct branch layouts compiled into the Triton merge (each one more compile);
#: past them the kernel reads the layout from memory. The layout depends on
#: the length only below a branch's segment length (segments clipped to the sequence).
STATIC_LAYOUTS_MAX = 8
_STATIC_LAYOUTS: set[tuple[tuple[int, ...], ...]] = set()


def static_layout(parts: BranchBuffers) -> tuple[tuple[int, ...], ...] | None:
    """``parts``' segment lengths, dilations and rows per segment, to compile into the
    merge kernel (divisions by constants instead of by values it loads), unless
    :data:`STATIC_LAYOUTS_MAX` other layouts already were."""
    layout = tuple(row[:3] for row in parts.meta)
    if layout in _STATIC_LAYOUTS or len(_STATIC_LAYOUTS) < STATIC_LAYOUTS_MAX:
        _STATIC_LAYOUTS.add(layout)
        return layout
    return None


def merge_branches(
    out: Tensor,
    lse: Tensor | None,
    rows: dict[int, BranchRows],
    parts: BranchBuffers,
    part_lse: BranchBuffers | None,
    heads: range,
) -> None:
    """``out`` ``(batch, seq, heads, head_dim)``, holding ``heads``, from every
    branch's compact results (the adopted branch's from its problem's result): their
    lse merge (docs/semantics.md; also writes the merged ``lse``) when lses are given,
    else their sum (dq, dk, dv)."""
    adopted = None
    if parts.adopted_index is not None:
        adopted_lse = None if part_lse is None else part_lse.adopted_rows()
        adopted = (parts.adopted_index, parts.adopted_rows(), adopted_lse)
    if merge_triton.can_merge_branches(out, max(br.num_rows for br in rows.values()), adopted):
        merge_triton.merge_branches(
            out,
            lse,
            parts.flat,
            None if part_lse is None else part_lse.flat,
            *_branch_meta(parts, out.device),
            heads.start,
            adopted,
            static_meta=static_layout(parts),
        )
        return
    b, n, c, _ = out.shape
    acc_dtype = accumulation_dtype(out.dtype)
    acc = out.new_zeros(out.shape, dtype=acc_dtype)
    top = None if lse is None else out.new_full((b, n, c), -math.inf, dtype=acc_dtype)
    total = None if lse is None else out.new_zeros((b, n, c), dtype=acc_dtype)
    position = torch.arange(n, device=out.device)[:, None]
    head = torch.arange(heads.start, heads.stop, device=out.device)[None, :]
    for branch, br in rows.items():
        t = position % br.segment_length
        offsets = torch.tensor(br.offsets, device=out.device)[head]
        selected = t % br.dilation == offsets
        index = torch.where(
            selected, position // br.segment_length * br.rows_per_segment + t // br.dilation, 0
        )
        # unselected rows of the buffers were never written: mask what the gather read
        part = parts.block(branch)[:, index, head - heads.start].masked_fill(~selected[..., None], 0.0)
        if part_lse is None or top is None or total is None:
            acc.add_(part)
            continue
        branch_lse = part_lse.block(branch)[:, index, head - heads.start].masked_fill(~selected, -math.inf)
        merge_online(acc, top, total, part.to(acc_dtype), branch_lse.to(acc_dtype))
    if top is None or total is None or lse is None:
        out.copy_(acc)
        return
    merged, merged_lse = merge_finish(acc, top, total)
    out.copy_(merged)
    lse.copy_(merged_lse)
