"""One-pass lse merges on CUDA (Triton).

- :func:`merge_into`: one more term of an online lse merge (unnormalised
  output, running max and sum) on strided views, one branch problem at a time
  (problems that span ranks).
  The torch version (``merge.merge_online``) launches about ten
  elementwise kernels per problem and moves ~40 bytes per output element;
  fused it reads the accumulator and the part once and writes it once.
- :func:`add_at_rows`: a sum of parts at row indices in the destination's dtype
  (packed documents' float32 gradients), without a converted copy of each part.
- :func:`merge_branches`: every branch at once from compact buffers
  (``pattern.BranchRows``): each output element is written once, from the
  branches' results and lse, with no float32 accumulator in memory; also the
  plain sum the "all"-mode backward needs for dq, dk, dv.

Used only where Triton and CUDA are present; the torch versions in
:mod:`.merge` are the fallback and the reference the tests compare with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._triton import AVAILABLE, launch_device, runs_on, tiles

if AVAILABLE:
    import triton
    import triton.language as tl

    from ._triton import batch_rows

    @triton.jit
    def _merge_kernel(
        out_ptr,
        top_ptr,
        total_ptr,
        part_ptr,
        plse_ptr,
        index_ptr,
        rows_total,
        size_s,
        size_m,
        size_h,
        head_dim,
        o_b, o_s, o_m, o_h,
        l_b, l_s, l_m, l_h,
        t_b, t_s, t_m, t_h,
        p_b, p_s, p_m, p_h,
        q_b, q_s, q_m, q_h,
        INDEXED: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # the online merge of merge.merge_online: out holds the outputs weighted
        # by exp(lse - top), unnormalised, so no rounded lse enters a weight;
        # INDEXED: part row m merges into accumulator row index[m]
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < rows_total
        ih = rows % size_h
        t = rows // size_h
        im = t % size_m
        t = t // size_m
        i_s = t % size_s
        ib = t // size_s
        dm = tl.load(index_ptr + im, mask=row_ok, other=0).to(tl.int64) if INDEXED else im
        top_off = ib * l_b + i_s * l_s + dm * l_m + ih * l_h
        total_off = ib * t_b + i_s * t_s + dm * t_m + ih * t_h
        plse_off = ib * q_b + i_s * q_s + im * q_m + ih * q_h
        old = tl.load(top_ptr + top_off, mask=row_ok, other=float("-inf")).to(tl.float32)
        new = tl.load(plse_ptr + plse_off, mask=row_ok, other=float("-inf")).to(tl.float32)
        top = tl.maximum(old, new)
        safe = tl.where(top == float("-inf"), 0.0, top)
        rescale = tl.exp(old - safe)
        weight = tl.exp(new - safe)
        total = tl.load(total_ptr + total_off, mask=row_ok, other=0.0).to(tl.float32) * rescale + weight

        cols = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < head_dim)[None, :]
        o_off = (ib * o_b + i_s * o_s + dm * o_m + ih * o_h)[:, None] + cols[None, :]
        p_off = (ib * p_b + i_s * p_s + im * p_m + ih * p_h)[:, None] + cols[None, :]
        acc = tl.load(out_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        part = tl.load(part_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        result = acc * rescale[:, None] + part * weight[:, None]
        tl.store(out_ptr + o_off, result.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(top_ptr + top_off, top.to(top_ptr.dtype.element_ty), mask=row_ok)
        tl.store(total_ptr + total_off, total.to(total_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _branches_kernel(
        out_ptr,
        lse_ptr,
        part_ptr,
        plse_ptr,
        meta_ptr,
        offsets_ptr,
        adopt_ptr,
        alse_ptr,
        rows_per_batch,
        num_heads,
        layer_heads,
        first_head,
        head_dim,
        o_b, o_n, o_h,
        l_b, l_n, l_h,
        a_b, a_s, a_m, a_h,
        al_b, al_s, al_m, al_h,
        NUM_BRANCHES: tl.constexpr,
        ADOPTED: tl.constexpr,
        WEIGHTED: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STATIC_META: tl.constexpr = False,
        SEGMENTS: tl.constexpr = (),
        DILATIONS: tl.constexpr = (),
        PER_SEGMENT: tl.constexpr = (),
    ):  # fmt: skip
        # STATIC_META: segment lengths, dilations and rows per segment are compile-time
        # constants (divisions by them become multiplies), else read from meta.
        # One (position, head) of batch program_id(1) per row; meta holds per branch:
        # segment length, dilation, rows per segment, first unit, units per batch (a
        # unit is one (row, head) of the compact buffers: head_dim elements, one lse);
        # offsets (branches, layer_heads) holds each head's offset in each branch.
        # Branch ADOPTED (-1: none) is read from its problem's result at adopt_ptr
        # (batch, segments, rows_per_segment, heads[, head_dim]) instead of the buffers.
        # The branch loop is unrolled so that every branch's loads are in flight at
        # once (as a loop, each branch waited on the one before it)
        p, ih, ib, row_ok = batch_rows(rows_per_batch, num_heads, BLOCK_R)
        j = first_head + ih
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < head_dim
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        top = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for i in tl.static_range(NUM_BRANCHES):
            if STATIC_META:
                w = SEGMENTS[i]
                r = DILATIONS[i]
            else:
                w = tl.load(meta_ptr + 5 * i).to(tl.int32)
                r = tl.load(meta_ptr + 5 * i + 1).to(tl.int32)
            segment = p // w
            tin = p - segment * w
            m = tin // r
            offset = tl.load(offsets_ptr + i * layer_heads + j, mask=row_ok, other=-1)
            sel = row_ok & (tin - m * r == offset)
            if i == ADOPTED:
                segment64, m64, ih64 = segment.to(tl.int64), m.to(tl.int64), ih.to(tl.int64)
                src = ib * a_b + segment64 * a_s + m64 * a_m + ih64 * a_h
                part = tl.load(
                    adopt_ptr + src[:, None] + cols[None, :], mask=sel[:, None] & col_ok[None, :], other=0.0
                ).to(tl.float32)
                lse_src = alse_ptr + ib * al_b + segment64 * al_s + m64 * al_m + ih64 * al_h
            else:
                if STATIC_META:
                    per_segment = PER_SEGMENT[i]
                else:
                    per_segment = tl.load(meta_ptr + 5 * i + 2).to(tl.int32)
                unit = tl.load(meta_ptr + 5 * i + 3) + ib * tl.load(meta_ptr + 5 * i + 4)
                unit += ((segment * per_segment + m) * num_heads + ih).to(tl.int64)
                part = tl.load(
                    part_ptr + unit[:, None] * head_dim + cols[None, :],
                    mask=sel[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                lse_src = plse_ptr + unit
            if WEIGHTED:
                # online softmax over branches; -inf (no key) gets weight 0, never NaN
                branch_lse = tl.load(lse_src, mask=sel, other=float("-inf")).to(tl.float32)
                new_top = tl.maximum(top, branch_lse)
                safe = tl.where(new_top == float("-inf"), 0.0, new_top)
                rescale = tl.exp(top - safe)
                weight = tl.exp(branch_lse - safe)
                acc = acc * rescale[:, None] + part * weight[:, None]
                total = total * rescale + weight
                top = new_top
            else:
                acc += part
        # int64: position · (heads · head_dim) passes 2**31 from 2**19 positions of 32 heads of 128
        position = p.to(tl.int64)
        if WEIGHTED:
            has_key = total > 0
            norm = tl.where(has_key, total, 1.0)
            acc = acc / norm[:, None]
            merged = tl.where(has_key, tl.where(has_key, top, 0.0) + tl.log(norm), float("-inf"))
            tl.store(
                lse_ptr + ib * l_b + position * l_n + ih * l_h,
                merged.to(lse_ptr.dtype.element_ty),
                mask=row_ok,
            )
        o_off = (ib * o_b + position * o_n + ih * o_h)[:, None] + cols[None, :]
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _add_rows_kernel(
        dest_ptr,
        part_ptr,
        index_ptr,
        units,
        size_h,
        head_dim,
        d_m, d_h,
        p_m, p_h,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # dest[index[m], h] += part[m, h] for one (m, h) per row, in dest's dtype
        # (float32 sums of bf16 parts without a converted copy); indices distinct
        unit = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = unit < units
        ih = unit % size_h
        im = unit // size_h
        dm = tl.load(index_ptr + im, mask=ok, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (cols < head_dim)[None, :]
        d_off = (dm * d_m + ih * d_h)[:, None] + cols[None, :]
        p_off = (im * p_m + ih * p_h)[:, None] + cols[None, :]
        acc = tl.load(dest_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        part = tl.load(part_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dest_ptr + d_off, (acc + part).to(dest_ptr.dtype.element_ty), mask=mask)


def _exact_in_float32(*tensors: Tensor) -> bool:
    """The kernels here compute in float32: float64 results take the torch merges."""
    return all(x.dtype != torch.float64 for x in tensors)


def _takes(dest: Tensor, part: Tensor, dims: int) -> bool:
    """A kernel here takes ``dims``-D CUDA tensors whose last dim (at most 512) is
    contiguous, none of them float64."""
    return (
        runs_on(dest, part)
        and _exact_in_float32(dest, part)
        and dest.dim() == dims
        and dest.stride(-1) == 1
        and part.stride(-1) == 1
        and dest.shape[-1] <= 512
    )


def can_merge(out5: Tensor, part_out: Tensor) -> bool:
    """The fused merge takes 5-D CUDA views whose last dim is contiguous."""
    return _takes(out5, part_out, 5)


def merge_into(
    out5: Tensor, top4: Tensor, total4: Tensor, part_out: Tensor, part_lse: Tensor, rows: Tensor | None = None
) -> None:
    """In place, one more term of an online lse merge (``merge.merge_online``):
    ``out5`` ``(batch, segments, length, heads, head_dim)`` and ``top4``/``total4``
    (the same without head_dim) take in ``part_out``/``part_lse`` (same shapes; with
    ``rows``, int64 ``(m,)`` distinct indices into ``length``, the parts have ``m``
    rows there and row ``i`` merges into row ``rows[i]``)."""
    b, s, _, h, d = out5.shape
    m = part_out.shape[2]
    units = b * s * m * h
    block_r, block_d = tiles(d)
    grid = (triton.cdiv(units, block_r),)
    with launch_device(out5):
        _merge_kernel[grid](
            out5, top4, total4, part_out, part_lse, part_lse if rows is None else rows, units, s, m, h, d,
            *out5.stride()[:4], *top4.stride(), *total4.stride(), *part_out.stride()[:4],
            *part_lse.stride(), INDEXED=rows is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip


#: a branch read from its problem's result: ``(branch index, rows (batch, segments,
#: rows_per_segment, heads, head_dim), their lse (the same without head_dim) or None)``
Adopted = tuple[int, Tensor, Tensor | None]


def can_merge_branches(out: Tensor, max_rows: int, adopted: Adopted | None = None) -> bool:
    """:func:`merge_branches` writes CUDA outputs whose last dim is contiguous, from
    branch buffers of at most ``max_rows`` rows (row and position arithmetic in int32)
    and an adopted result whose last dim is contiguous."""
    b, n, h, d = out.shape
    adopted_ok = adopted is None or (runs_on(adopted[1]) and adopted[1].stride(-1) == 1)
    return (
        runs_on(out) and _exact_in_float32(out) and out.stride(-1) == 1 and d <= 512
        and max(max_rows, n) * h < 2**31
        and b < 2**16  # the grid's second dimension
        and adopted_ok
    )  # fmt: skip


def merge_branches(
    out: Tensor,
    lse: Tensor | None,
    parts: Tensor,
    part_lse: Tensor | None,
    meta: Tensor,
    offsets: Tensor,
    first_head: int,
    adopted: Adopted | None = None,
    *,
    block_r: int | None = None,
    num_warps: int | None = None,
    static_meta: Sequence[tuple[int, ...]] | None = None,
) -> None:
    """``out`` ``(batch, seq, heads, head_dim)`` (heads ``first_head`` on) from the
    compact branch buffers ``parts`` (flat) described by ``meta`` (int64
    ``(branches, 5)``, see the kernel) and ``offsets`` (int32 ``(branches, heads of
    the layer)``, every head's offset), and the ``adopted`` branch's result. With
    ``lse``/``part_lse``: the lse merge, writing the merged lse ``(batch, seq,
    heads)`` too; without: the plain sum. ``block_r`` (position, head) rows per
    program and ``num_warps``: the defaults are tiles of 2048 elements, 2 warps for
    the lse merge and 4 for the sum (``benchmarks/probes/merge_tiles.py``; measured
    in docs/benchmark_details.md). ``static_meta``: the first three columns of
    ``meta``'s rows on the host (segment length, dilation, rows per segment per
    branch), compiled into the kernel: one kernel per layout, divisions by constants
    instead of by values read from memory."""
    b, n, h, d = out.shape
    default_rows, block_d = tiles(d, 2048)
    weighted = lse is not None
    index, rows, rows_lse = adopted if adopted is not None else (-1, parts, None)
    row_strides = rows.stride()[:4] if adopted is not None else (0, 0, 0, 0)
    lse_strides = rows_lse.stride() if rows_lse is not None and weighted else (0, 0, 0, 0)
    rows_lse = rows_lse if rows_lse is not None and weighted else parts  # unread then
    block_r = block_r or default_rows
    with launch_device(out):
        _branches_kernel[(triton.cdiv(n * h, block_r), b)](
            out, lse if weighted else out, parts, part_lse if weighted else parts, meta, offsets,
            rows, rows_lse, n * h, h, offsets.shape[1], first_head, d,
            *out.stride()[:3], *(lse.stride() if weighted and lse is not None else (0, 0, 0)),
            *row_strides, *lse_strides,
            NUM_BRANCHES=meta.shape[0], ADOPTED=index, WEIGHTED=weighted, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=num_warps or (2 if weighted else 4), **_static_meta(static_meta),
        )  # fmt: skip


def _static_meta(rows: Sequence[tuple[int, ...]] | None) -> dict[str, object]:
    """The kernel's compile-time branch layout from ``meta``'s host rows (their
    first three columns)."""
    if rows is None:
        return {}
    segments, dilations, per_segment = (tuple(int(r[k]) for r in rows) for k in range(3))
    return {"STATIC_META": True, "SEGMENTS": segments, "DILATIONS": dilations, "PER_SEGMENT": per_segment}


def can_add_at_rows(dest: Tensor, part: Tensor) -> bool:
    """:func:`add_at_rows` takes 3-D CUDA tensors whose last dim is contiguous."""
    return _takes(dest, part, 3)


def add_at_rows(dest: Tensor, rows: Tensor, part: Tensor) -> None:
    """``dest[rows[i]] += part[i]`` in ``dest``'s dtype: ``dest`` ``(length, heads,
    head_dim)``, ``part`` ``(m, heads, head_dim)``, ``rows`` int64 ``(m,)`` distinct."""
    m, h, d = part.shape
    units = m * h
    block_r, block_d = tiles(d)
    with launch_device(dest):
        _add_rows_kernel[(triton.cdiv(units, block_r),)](
            dest, part, rows, units, h, d, *dest.stride()[:2], *part.stride()[:2],
            BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
