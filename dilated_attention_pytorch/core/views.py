"""A branch call's positions and heads as strided views of ``(batch, seq, heads, ...)``
tensors: how every problem of the fused path reads its inputs and writes its results
without copies."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from ..pattern import BranchCall


def positions(call: BranchCall, device: torch.device) -> Tensor:
    """Sequence positions of ``call``, ``(segments, length)`` (one offset for all its heads)."""
    if call.offset_step:
        raise ValueError("a diagonal call (offset_step != 0) has positions per head")
    seg = torch.arange(call.num_segments, device=device) * call.segment_length
    m = torch.arange(call.length, device=device) * call.dilation
    return call.start + call.offset + seg[:, None] + m[None, :]


def strided(x: Tensor, call: BranchCall, first_head: int = 0) -> Tensor:
    """``x[:, positions, heads]`` as a view ``(batch, segments, length, heads, *rest)``
    of a ``(batch, seq, heads, *rest)`` tensor, for any input strides; ``x`` may
    hold only the heads from ``first_head`` on.

    One ``as_strided`` rather than a chain of slices: it is called a dozen times
    per problem and the slices' host time showed at small n."""
    stride_b, stride_n, stride_h, *rest = x.stride()
    return x.as_strided(
        (x.shape[0], call.num_segments, call.length, call.num_heads, *x.shape[3:]),
        (
            stride_b,
            call.segment_length * stride_n,
            call.dilation * stride_n,
            _head_stride(call, stride_n, stride_h),
            *rest,
        ),
        _first_element(x, call, first_head),
    )


#: widest element first: torch's strided copy moves one element per thread, so a
#: bf16 row copied as 16-byte elements moves 8 times the bytes per thread
_WIDE_DTYPES = (torch.complex128, torch.int64, torch.int32)

#: where complex128 views copy (MPS, for one, has no complex128)
_WIDE_COPY_DEVICES = ("cuda", "cpu")

#: bytes below which a copy is plain: its GPU time is less than the host time of
#: the two wide views (the many small copies of short sequences' head chunks)
WIDE_COPY_MIN_BYTES = 1 << 22


def copy_rows(dest: Tensor, src: Tensor) -> None:
    """``dest.copy_(src)`` for same-shape tensors whose last dim is contiguous (rows
    of ``head_dim``), as the widest element both allow where the copy is large
    (:data:`WIDE_COPY_MIN_BYTES`); a plain copy otherwise."""
    # cheapest test first: most copies of short sequences are small
    if (
        dest.numel() * dest.element_size() >= WIDE_COPY_MIN_BYTES
        and dest.dtype == src.dtype
        and dest.shape == src.shape
        and dest.dim() > 0
        and dest.device.type in _WIDE_COPY_DEVICES
    ):
        itemsize = dest.element_size()
        for wide in _WIDE_DTYPES:
            ratio = wide.itemsize // itemsize
            if ratio > 1 and _viewable(dest, ratio) and _viewable(src, ratio):
                dest.view(wide).copy_(src.view(wide))
                return
    dest.copy_(src)


def _viewable(x: Tensor, ratio: int) -> bool:
    """Whether ``x.view(dtype)`` for a dtype ``ratio`` times as wide is allowed
    (last dim contiguous and divisible, every other stride and the offset divisible)."""
    *strides, last = x.stride()
    return (
        last == 1
        and x.shape[-1] % ratio == 0
        and x.storage_offset() % ratio == 0
        and all(stride % ratio == 0 for stride in strides)
    )


def stacked_view(tensors: Sequence[Tensor], dim: int) -> Tensor | None:
    """``torch.stack(tensors, dim)`` as a view of their storage, where they are the
    slices ``0, 1, ...`` along ``dim`` of one tensor (``x.unbind(dim)``, say: the
    queries, keys and values of one projection): equal shapes, strides and dtypes
    at one step of storage offset, and no element in two of them. None otherwise,
    and while ``torch.compile`` traces (fake tensors have no storage to compare)."""
    first = tensors[0]
    if len(tensors) < 2 or torch.compiler.is_compiling() or first.device.type == "meta":
        return None
    shape, stride, dtype = first.shape, tuple(int(s) for s in first.stride()), first.dtype
    if any(t.shape != shape or tuple(t.stride()) != stride or t.dtype != dtype for t in tensors[1:]):
        return None
    storage = first.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage for t in tensors[1:]):
        return None
    step = int(tensors[1].storage_offset() - first.storage_offset())
    offsets = [t.storage_offset() for t in tensors]
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(offsets)):
        return None
    dim = dim % (first.dim() + 1)
    sizes = (*shape[:dim], len(tensors), *shape[dim:])
    strides = (*stride[:dim], step, *stride[dim:])
    if not _non_overlapping(sizes, strides):
        return None
    return first.as_strided(sizes, strides, first.storage_offset())


def _non_overlapping(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two indices of a ``sizes``/``strides`` view reach one element:
    each dim's stride passes the extent of the dims of smaller strides."""
    extent = 0
    for size, stride in sorted(((n, st) for n, st in zip(sizes, strides) if n > 1), key=lambda p: p[1]):
        if stride <= extent:
            return False
        extent += (size - 1) * stride
    return True


def region(x: Tensor, call: BranchCall, first_head: int = 0) -> Tensor:
    """The call's region of a ``(batch, seq, heads, *rest)`` tensor: every position
    from ``start`` over its ``num_segments · segment_length``, selected or not, of
    the call's heads, as a view ``(batch, span, heads, *rest)``."""
    stride_b, stride_n, stride_h, *rest = x.stride()
    span = call.num_segments * call.segment_length
    return x.as_strided(
        (x.shape[0], span, call.num_heads, *x.shape[3:]),
        (stride_b, stride_n, call.head_step * stride_h, *rest),
        int(x.storage_offset() + call.start * stride_n + (call.head_start - first_head) * stride_h),
    )


def _head_stride(call: BranchCall, stride_n: int, stride_h: int) -> int:
    # a diagonal's next head reads one position further on
    return call.head_step * stride_h + call.offset_step * stride_n


def _first_element(x: Tensor, call: BranchCall, first_head: int = 0) -> int:
    """Storage offset of ``x``'s element at the call's first position and head."""
    _, stride_n, stride_h = x.stride()[:3]
    return int(
        x.storage_offset() + (call.start + call.offset) * stride_n + (call.head_start - first_head) * stride_h
    )


def problem_view(x: Tensor, call: BranchCall) -> Tensor:
    """``x[:, positions, heads]`` in problem layout ``(batch·segments, heads, length, *rest)``:
    one view unless batch > 1, the call has several segments and batch·segments is
    not one dimension of ``x`` (segments that do not tile it, or an unusual batch
    stride): then a copy."""
    stride_b, stride_n, stride_h, *rest = x.stride()
    batch, segments = x.shape[0], call.num_segments
    stride_segment = call.segment_length * stride_n
    if batch > 1 and segments > 1 and stride_b != segments * stride_segment:
        return strided(x, call).flatten(0, 1).transpose(1, 2)
    return x.as_strided(
        (batch * segments, call.num_heads, call.length, *x.shape[3:]),
        (
            stride_segment if segments > 1 else stride_b,
            _head_stride(call, stride_n, stride_h),
            call.dilation * stride_n,
            *rest,
        ),
        _first_element(x, call),
    )


def from_problem(x: Tensor, batch: int) -> Tensor:
    """Inverse of :func:`problem_view` (may copy)."""
    x = x.transpose(1, 2)
    return x.reshape(batch, x.shape[0] // batch, *x.shape[1:])
