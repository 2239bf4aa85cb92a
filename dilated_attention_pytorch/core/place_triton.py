"""One pass per branch problem that writes its whole region of a result on CUDA
(Triton): the problem's rows where it has them, zeros (and -inf lse) on the rows
of its segments it does not select. Grouped heads need both, and a zero fill of
the whole result followed by a strided copy of each problem moved about a third
more bytes, at half the copy kernel's bandwidth (``benchmarks/profile_step.py``).

:mod:`.place` decides where it runs; its torch version there is the fallback and
the reference the tests compare with."""

from __future__ import annotations

from torch import Tensor

from ..pattern import BranchCall
from ._triton import AVAILABLE, launch_device, runs_on, tiles

if AVAILABLE:
    import triton
    import triton.language as tl

    from ._triton import batch_rows

    @triton.jit
    def _place_kernel(
        dest_ptr,
        dlse_ptr,
        part_ptr,
        plse_ptr,
        rows_per_batch,
        num_heads,
        head_dim,
        segment_length,
        dilation,
        offset,
        offset_step,
        length,
        d_b, d_n, d_h,
        l_b, l_n, l_h,
        p_b, p_s, p_m, p_h,
        q_b, q_s, q_m, q_h,
        HAS_LSE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one (position of the region, head of the call) per row; dest/dlse start at
        # the region's first position and the call's first head; offsets in int64
        p, jh, ib, row_ok = batch_rows(rows_per_batch, num_heads, BLOCK_R)
        s = p // segment_length
        k = p - s * segment_length - offset - offset_step * jh
        kk = tl.maximum(k, 0)
        m = kk // dilation
        sel = row_ok & (k >= 0) & (kk - m * dilation == 0) & (m < length)
        jh64 = jh.to(tl.int64)
        src = ib * p_b + s.to(tl.int64) * p_s + m.to(tl.int64) * p_m + jh64 * p_h
        dst = ib * d_b + p.to(tl.int64) * d_n + jh64 * d_h
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < head_dim
        part = tl.load(
            part_ptr + src[:, None] + cols[None, :], mask=sel[:, None] & col_ok[None, :], other=0.0
        )
        tl.store(
            dest_ptr + dst[:, None] + cols[None, :],
            part.to(dest_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
        if HAS_LSE:
            src_lse = ib * q_b + s.to(tl.int64) * q_s + m.to(tl.int64) * q_m + jh64 * q_h
            lse = tl.load(plse_ptr + src_lse, mask=sel, other=float("-inf"))
            dst_lse = ib * l_b + p.to(tl.int64) * l_n + jh64 * l_h
            tl.store(dlse_ptr + dst_lse, lse.to(dlse_ptr.dtype.element_ty), mask=row_ok)


def can_place(region: Tensor, part: Tensor, call: BranchCall) -> bool:
    """The kernel takes 3/5-D tensors whose last dim (at most 512) is contiguous,
    with fewer than 2**31 (position, head) pairs per batch element, and batches under 2**16."""
    return (
        runs_on(region, part)
        and region.stride(-1) == 1
        and part.stride(-1) == 1
        and region.shape[-1] <= 512
        and region.shape[1] * call.num_heads < 2**31
        and region.shape[0] < 2**16
    )


def place(
    region: Tensor, region_lse: Tensor | None, call: BranchCall, part: Tensor, part_lse: Tensor | None
) -> None:
    """Write ``region`` ``(batch, span, call heads, head_dim)`` (the call's positions
    ``start ..`` and heads of a result; ``span = num_segments · segment_length``) from
    ``part`` ``(batch, num_segments, length, call heads, head_dim)``: its rows where
    the call selects them, zeros elsewhere; ``region_lse``/``part_lse`` alike (without
    head_dim), -inf elsewhere."""
    b, span, h, d = region.shape
    block_r, block_d = tiles(d)
    lse_args = (region_lse, part_lse) if region_lse is not None and part_lse is not None else (region, part)
    with launch_device(region):
        _place_kernel[(triton.cdiv(span * h, block_r), b)](
            region, lse_args[0], part, lse_args[1], span * h, h, d,
            call.segment_length, call.dilation, call.offset, call.offset_step, call.length,
            *region.stride()[:3], *lse_args[0].stride()[:3], *part.stride()[:4], *lse_args[1].stride()[:4],
            HAS_LSE=region_lse is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
