"""Packed documents on varlen kernels: per branch problem (branch, offset, the
heads that share it) one kernel call over every document's segments.

A branch's sequences are the selected positions of each segment of each
document (segments start at the document's first token; a document's last one
may be shorter). Dilation 1 selects every token in order, so its problem is the
packed tensors themselves; a larger rate gathers its rows (one
``index_select``) and puts its results back. Grouped heads: each (position,
head) has one result, written in place; "all": an online lse merge over the
branches. The backward runs each kernel's backward with the merged output and
lse (the ring-attention identity) and sums shared heads' gradients in float32.

No padding to the longest document, no ``(total, total)`` mask, and the number
of kernel calls is that of one unpacked sequence, whatever the documents.
"""

# no `from __future__ import annotations`: custom_op reads the signature's types
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from .._cache import BoundedCache
from .._checks import accumulation_dtype
from ..kernels.base import PackedSequences
from ..pattern import BranchCall, DilatedPattern, kv_call, split_for_kv
from .fused import functorch_active, recomputed_grads
from .gather import gathered_attention
from .merge import merge_finish, merge_online
from .varlen import check_cu_seqlens, grouped_by_length


@dataclasses.dataclass(frozen=True)
class PackedCall:
    """One kernel call: the query heads of ``heads`` (a part of :func:`split_for_kv`;
    only its head fields count) read the key/value heads of ``kv``, ``group``
    query heads each, on ``rows`` of the packed tensors (None: every row, in
    order), cut into sequences by ``seqs``."""

    heads: BranchCall
    kv: BranchCall
    group: int
    rows: Tensor | None
    seqs: PackedSequences


def head_view(x: Tensor, call: BranchCall) -> Tensor:
    """``x`` ``(rows, heads, ...)`` restricted to ``call``'s heads (a strided view)."""
    stop = call.head_start + call.head_step * (call.num_heads - 1) + 1
    return x[:, call.head_start : stop : call.head_step]


def _branch_rows(
    bounds: tuple[int, ...], segment_length: int, dilation: int, offset: int, device: torch.device
) -> tuple[Tensor | None, PackedSequences] | None:
    """``(rows, seqs)`` of one branch and offset over the documents ``bounds``
    (None: no position selected). Host arithmetic on segments, one gather
    index built on ``device``."""
    w, r = segment_length, dilation
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    lengths = torch.tensor(bounds[1:], dtype=torch.int64) - starts
    num_segments = (lengths + w - 1) // w  # 0 for an empty document
    doc = torch.repeat_interleave(torch.arange(len(lengths)), num_segments)
    index = torch.arange(len(doc)) - (torch.cumsum(num_segments, 0) - num_segments)[doc]
    segment_start = starts[doc] + index * w
    segment_len = torch.clamp(lengths[doc] - index * w, max=w)
    count = torch.div(segment_len - offset + r - 1, r, rounding_mode="floor").clamp_min(0)
    keep = count > 0
    segment_start, count = segment_start[keep], count[keep]
    if count.numel() == 0:
        return None
    cu = torch.zeros(count.numel() + 1, dtype=torch.int64)
    torch.cumsum(count, 0, out=cu[1:])
    seqs = PackedSequences(cu.to(device=device, dtype=torch.int32), tuple(count.tolist()), int(count.max()))
    if r == 1:  # offset 0: every token, in order
        return None, seqs
    num_rows = int(cu[-1])
    # row i of sequence s is position segment_start[s] + offset + r * (i - cu[s])
    base = (segment_start + offset - r * cu[:-1]).to(device)
    rows = torch.repeat_interleave(base, count.to(device), output_size=num_rows)
    return rows + r * torch.arange(num_rows, device=device), seqs


_CALLS: BoundedCache[list[PackedCall]] = BoundedCache(64)


def packed_calls(
    bounds: tuple[int, ...], pattern: DilatedPattern, num_heads: int, kv_heads: int, device: torch.device
) -> list[PackedCall]:
    """Every kernel call of the pattern on the documents ``bounds`` (kept: the
    backward and the next step of a fixed packing ask again)."""

    def build() -> list[PackedCall]:
        calls = []
        for branch, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
            for offset, heads in pattern.branch_heads(branch, num_heads):
                found = _branch_rows(bounds, w, r, offset, device)
                if found is None:
                    continue
                rows, seqs = found
                # only the head fields of these calls count
                whole = BranchCall(branch, offset, r, 0, w, 1, 1, heads.start, heads.step, len(heads))
                for part in split_for_kv([whole], num_heads, kv_heads):
                    kv, group = kv_call(part, num_heads, kv_heads)
                    calls.append(PackedCall(part, kv, group, rows, seqs))
        return calls

    return _CALLS.get((bounds, pattern, num_heads, kv_heads, device), build)


def _take(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(dest: Tensor, rows: Tensor | None, part: Tensor, add: bool) -> None:
    """``part`` into ``dest`` (a strided view) at ``rows``: added, or copied where
    no other call writes the same (row, head)."""
    part = part.to(dest.dtype)
    if rows is None:
        dest.add_(part) if add else dest.copy_(part)
    elif add:
        dest.index_add_(0, rows, part)
    else:
        dest.index_copy_(0, rows, part)


def _operands(
    call: PackedCall, backend: kernels.Backend, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(q, k, v, repeats)``: the call's rows and heads in the backend's layout;
    key/value repeated per query head (``repeats`` of them) only for a backend
    that does not take them shared."""
    rule = backend.strides
    q = rule.conform(_take(head_view(query, call.heads), call.rows))
    k, v = (rule.conform(_take(head_view(x, call.kv), call.rows)) for x in (key, value))
    if call.group == 1 or backend.SUPPORTS_GQA:
        return q, k, v, 1
    return q, k.repeat_interleave(call.group, dim=1), v.repeat_interleave(call.group, dim=1), call.group


def packed_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    calls: list[PackedCall],
    backend: kernels.Backend,
    merge: bool,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, list[Any]]:
    """``(out, lse, states)``: out ``(total, heads, head_dim)``, lse ``(total, heads)``
    float32 (float64 for float64 inputs), -inf where a (position, head) has no branch."""
    num_rows, h, _ = query.shape
    acc_dtype = accumulation_dtype(query.dtype)
    shape = (num_rows, h, value.shape[2])
    out = query.new_zeros(shape, dtype=acc_dtype if merge else query.dtype)
    lse = query.new_full((num_rows, h), float("-inf"), dtype=acc_dtype)
    # "all": out and lse hold an online merge's weighted sum and largest lse
    weights = query.new_zeros((num_rows, h), dtype=acc_dtype) if merge else None
    states = []
    for call in calls:
        q, k, v, _ = _operands(call, backend, query, key, value)
        part_out, part_lse, state = backend.forward_varlen(q, k, v, call.seqs, causal, scale)
        states.append(state)
        if weights is None:
            _put(head_view(out, call.heads), call.rows, part_out, add=False)
            _put(head_view(lse, call.heads), call.rows, part_lse, add=False)
            continue
        views = [head_view(x, call.heads) for x in (out, lse, weights)]
        acc, top, total = (_take(x, call.rows) for x in views)  # the views themselves without rows
        merge_online(acc, top, total, part_out.to(acc_dtype), part_lse.to(acc_dtype))
        if call.rows is not None:
            for dest, merged in zip(views, (acc, top, total)):
                dest.index_copy_(0, call.rows, merged)
    if weights is not None:
        out, lse = merge_finish(out, lse, weights)
    return out.to(query.dtype), lse, states


def packed_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    calls: list[PackedCall],
    backend: kernels.Backend,
    merge: bool,
    causal: bool,
    scale: float,
    states: list[Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`packed_forward`, in the inputs' shapes and dtypes
    (``states``: the forward's, or None after a replay)."""
    acc_dtype = accumulation_dtype(query.dtype)
    # a key/value (row, head) gets several calls' gradients: "all", or query heads sharing it
    shared = merge or key.shape[1] != query.shape[1]
    dq = query.new_zeros(query.shape, dtype=acc_dtype if merge else query.dtype)
    dk, dv = (x.new_zeros(x.shape, dtype=acc_dtype if shared else x.dtype) for x in (key, value))
    rule = backend.strides
    for i, call in enumerate(calls):
        q, k, v, repeats = _operands(call, backend, query, key, value)
        do, o = (rule.conform(_take(head_view(x, call.heads), call.rows)) for x in (grad_out, out))
        part_lse = _take(head_view(lse, call.heads), call.rows)
        state = None if states is None else states[i]
        part_dq, part_dk, part_dv = backend.backward_varlen(
            do, q, k, v, o, part_lse, call.seqs, causal, scale, state
        )
        if repeats > 1:
            part_dk, part_dv = (x.unflatten(1, (-1, repeats)).sum(2) for x in (part_dk, part_dv))
        _put(head_view(dq, call.heads), call.rows, part_dq, add=merge)
        _put(head_view(dk, call.kv), call.rows, part_dk, add=shared)
        _put(head_view(dv, call.kv), call.rows, part_dv, add=shared)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def _setup(
    query: Tensor, key: Tensor, cu_seqlens: Tensor, max_seqlen: int | None, segment_lengths: list[int],
    dilation_rates: list[int], head_mode: str, backend: str,
) -> tuple[list[PackedCall], kernels.Backend, DilatedPattern]:  # fmt: skip
    bounds = check_cu_seqlens(cu_seqlens, query.shape[0], max_seqlen, query.device)
    pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)  # type: ignore[arg-type]
    calls = packed_calls(tuple(bounds), pattern, query.shape[1], key.shape[1], query.device)
    return calls, kernels.REGISTRY[backend], pattern


@torch.library.custom_op("dilated_attention::varlen_forward", mutates_args=())
def varlen_forward_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of packed documents on the varlen form of ``backend``:
    out ``(total, heads, head_dim)``, lse ``(total, heads)`` float32 (float64 for
    float64 inputs). Reads ``cu_seqlens`` on the host (inside the operator, so
    ``torch.compile`` sees no graph break)."""
    calls, chosen, pattern = _setup(
        query, key, cu_seqlens, max_seqlen, segment_lengths, dilation_rates, head_mode, backend
    )
    out, lse, _ = packed_forward(query, key, value, calls, chosen, pattern.merges_branches, is_causal, scale)
    return out, lse


@varlen_forward_op.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    total, h, _ = query.shape
    out = query.new_empty(total, h, value.shape[2])
    return out, query.new_empty((total, h), dtype=accumulation_dtype(query.dtype))


@torch.library.custom_op("dilated_attention::varlen_backward", mutates_args=())
def varlen_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_forward_op`, in the inputs' shapes."""
    calls, chosen, pattern = _setup(
        query, key, cu_seqlens, max_seqlen, segment_lengths, dilation_rates, head_mode, backend
    )
    return packed_backward(
        grad_out, query, key, value, out, lse, calls, chosen, pattern.merges_branches, is_causal, scale
    )


@varlen_backward_op.register_fake
def _(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))  # type: ignore[return-value]


#: the operators' arguments after query, key, value, cu_seqlens
_STATIC = slice(4, None)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, cu_seqlens = inputs[:4]
    ctx.save_for_backward(query, key, value, *output, cu_seqlens)
    ctx.static = inputs[_STATIC]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    query, key, value, out, lse, cu_seqlens = ctx.saved_tensors
    none = (None,) * (len(ctx.static) + 1)
    # double backward and batched gradients: the same function in differentiable ops
    if torch.is_grad_enabled() or functorch_active(grad_out):
        _, segment_lengths, dilation_rates, head_mode, is_causal, scale, _ = ctx.static
        pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)
        bounds = cu_seqlens.tolist()

        def recompute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return grouped_by_length(q, k, v, bounds, _gathered(pattern, is_causal, scale))

        grads = recomputed_grads(recompute, (query, key, value), ctx.needs_input_grad[:3], grad_out)
        return (*grads, *none)
    grads = varlen_backward_op(grad_out, query, key, value, out, lse, cu_seqlens, *ctx.static)
    return (*grads, *none)


varlen_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _gathered(
    pattern: DilatedPattern, is_causal: bool, scale: float
) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """One group of equal-length documents on the gather path (plain torch ops)."""

    def attention(q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None) -> Tensor:
        bias = None
        if padding is not None and not is_causal:
            bias = torch.zeros(padding.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
            bias = bias.masked_fill(padding, float("-inf"))
        return gathered_attention(q, k, v, bias, None, pattern, is_causal, scale)

    return attention


def packed_backend(query: Tensor, value: Tensor, backend: str | None) -> kernels.Backend | None:
    """The backend whose varlen form runs packed documents, or None where the
    groups of equal length should (:mod:`.varlen`). A native varlen kernel is
    taken; a padded one only where it is the kernel the groups would use anyway
    (fewer calls, the same kernel)."""
    if value.shape[-1] != query.shape[-1]:
        return None
    name = _packed_backend_name(query.device, query.dtype, query.shape[-1], backend)
    return None if name is None else kernels.REGISTRY[name]


@torch.compiler.assume_constant_result
def _packed_backend_name(
    device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None
) -> str | None:
    # a constant of the installed kernels: torch.compile runs it once, traces none of it
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    spec = kernels.AttentionSpec(device.type, dtype, head_dim, compute_capability=cc)
    varlen = dataclasses.replace(spec, varlen=True)
    if backend is not None:
        named = kernels.REGISTRY.get(backend)
        return backend if named is not None and not named.not_supported_reasons(varlen) else None
    try:
        chosen = kernels.select_backend(varlen)
    except ValueError:
        return None
    if chosen.VARLEN == "native" or chosen is kernels.select_backend(spec):
        return chosen.name
    return None


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    backend: kernels.Backend,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of packed documents through the registered operators."""
    return varlen_forward_op(  # type: ignore[no-any-return]
        query,
        key,
        value,
        cu_seqlens,
        max_seqlen,
        list(pattern.segment_lengths),
        list(pattern.dilation_rates),
        pattern.head_mode,
        is_causal,
        float(scale),
        backend.name,
    )


__all__ = ["PackedCall", "packed_attention", "packed_backend", "packed_calls", "varlen_backward_op"]
