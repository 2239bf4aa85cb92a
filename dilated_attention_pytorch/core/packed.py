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

Whole segments of a long document are read in place, as the unpacked path
reads them: one strided view per document and problem (no gather), on the
dense kernel. The rest (short documents' whole segments, every partial
segment) is gathered.

No padding to the longest document, no ``(total, total)`` mask, and the number
of kernel calls is that of one unpacked sequence plus one per long document
and problem, whatever the documents.
"""

# no `from __future__ import annotations`: custom_op reads the signature's types
import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from .._cache import BoundedCache
from .._checks import accumulation_dtype, mask_to_bias
from ..kernels.base import PackedSequences
from ..pattern import BranchCall, DilatedPattern, kv_call, selected_count, split_for_kv
from .blockwise import kv_grads, shared_kv
from .fused import Recompute, fake_grads, register_operator_autograd
from .gather import gathered_attention
from .merge import add_at_rows, merge_finish, merge_into
from .varlen import grouped_by_length, host_bounds
from .views import copy_rows, from_problem, problem_view, strided


@dataclasses.dataclass(frozen=True)
class DenseBlock:
    """The leading ``num_seqs · length`` rows of a call: sequences of one length
    (whole segments), run as one ``(num_seqs, heads, length, d)`` batch on a
    dense kernel."""

    num_seqs: int
    length: int

    @property
    def num_rows(self) -> int:
        return self.num_seqs * self.length

    def batch(self, x: Tensor) -> Tensor:
        """``(num_seqs, heads, length[, d])`` view of the leading rows of ``(rows, heads[, d])``."""
        return x[: self.num_rows].unflatten(0, (self.num_seqs, self.length)).transpose(1, 2)

    def rows_of(self, batched: Tensor) -> Tensor:
        """``(num_rows, heads[, d])`` of a ``(num_seqs, heads, length[, d])`` result."""
        return batched.transpose(1, 2).flatten(0, 1)


@dataclasses.dataclass(frozen=True)
class PackedCall:
    """One problem: the query heads of ``heads`` (a part of :func:`split_for_kv`;
    only its head fields count) read the key/value heads of ``kv``, ``group``
    query heads each, on ``rows`` of the packed tensors (None: every row, in
    order). Its leading rows may be a ``dense`` batch of whole segments; the
    rest are sequences ``seqs`` for the varlen kernel (None: no rest)."""

    heads: BranchCall
    kv: BranchCall
    group: int
    rows: Tensor | None
    dense: DenseBlock | None
    seqs: PackedSequences | None
    #: the whole segments of long documents, read in place: per document, the
    #: call of its segments (start, num_segments, length) on this call's heads
    in_place: tuple[BranchCall, ...] = ()

    def kv_of(self, doc: BranchCall) -> BranchCall:
        """``doc`` (one of :attr:`in_place`) on the key/value heads."""
        return dataclasses.replace(
            doc, head_start=self.kv.head_start, head_step=self.kv.head_step, num_heads=self.kv.num_heads
        )

    def pieces(self) -> list[tuple[slice, DenseBlock | None]]:
        """``(rows of the call, dense block or None for the varlen part)``."""
        split = 0 if self.dense is None else self.dense.num_rows
        found: list[tuple[slice, DenseBlock | None]] = []
        if self.dense is not None:
            found.append((slice(0, split), self.dense))
        if self.seqs is not None:
            found.append((slice(split, None), None))
        return found


@dataclasses.dataclass(frozen=True)
class PackedKernels:
    """The varlen kernel, and the dense one that runs whole segments (None: the
    varlen kernel runs everything)."""

    varlen: kernels.Backend
    dense: kernels.Backend | None = None

    @property
    def name(self) -> str:
        return self.varlen.name if self.dense is None else f"{self.varlen.name}+{self.dense.name}"

    @property
    def strides(self) -> kernels.StrideRule:
        rules = [self.varlen.strides] + ([] if self.dense is None else [self.dense.strides])
        return kernels.StrideRule.strictest(rules)

    @property
    def shares_kv(self) -> bool:
        return self.varlen.SUPPORTS_GQA and (self.dense is None or self.dense.SUPPORTS_GQA)


def head_view(x: Tensor, call: BranchCall) -> Tensor:
    """``x`` ``(rows, heads, ...)`` restricted to ``call``'s heads (a strided view)."""
    stop = call.head_start + call.head_step * (call.num_heads - 1) + 1
    return x[:, call.head_start : stop : call.head_step]


#: a long document's whole segments of a problem are read in place (one kernel call
#: for them) from this many query rows on; shorter ones join the gathered batch
IN_PLACE_MIN_ROWS = 16384


def _branch_rows(
    bounds: tuple[int, ...],
    segment_length: int,
    dilation: int,
    offset: int,
    device: torch.device,
    dense_ok: Callable[[int], bool],
) -> tuple[Tensor | None, DenseBlock | None, PackedSequences | None, tuple[tuple[int, int], ...]] | None:
    """``(rows, dense, seqs, in_place)`` of one branch and offset over the documents
    ``bounds`` (None: no position selected). ``in_place``: ``(document start,
    whole segments)`` of the documents whose whole segments are read in place (at
    least :data:`IN_PLACE_MIN_ROWS` rows, where ``dense_ok(their length)``); the
    other whole segments go first in ``rows`` as the dense block where
    ``dense_ok``, the rest are ``seqs``. Host arithmetic on segments, one gather
    index built on ``device`` (None: every row in order)."""
    w, r = segment_length, dilation
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    lengths = torch.tensor(bounds[1:], dtype=torch.int64) - starts
    whole_count = selected_count(w, r, offset)
    per_doc = lengths // w  # whole segments per document
    long_docs = torch.zeros(len(lengths), dtype=torch.bool)
    if whole_count and dense_ok(whole_count):
        long_docs = per_doc * whole_count >= IN_PLACE_MIN_ROWS
    in_place = tuple((int(starts[d]), int(per_doc[d])) for d in torch.nonzero(long_docs).flatten())
    num_segments = (lengths + w - 1) // w  # 0 for an empty document
    doc = torch.repeat_interleave(torch.arange(len(lengths)), num_segments)
    index = torch.arange(len(doc)) - (torch.cumsum(num_segments, 0) - num_segments)[doc]
    segment_start = starts[doc] + index * w
    segment_len = torch.clamp(lengths[doc] - index * w, max=w)
    count = torch.div(segment_len - offset + r - 1, r, rounding_mode="floor").clamp_min(0)
    keep = count > 0
    keep &= ~(long_docs[doc] & (segment_len == w))  # those are read in place, not gathered
    segment_start, segment_len, count = segment_start[keep], segment_len[keep], count[keep]
    if count.numel() == 0:
        return (None, None, None, in_place) if in_place else None
    whole = segment_len == w
    dense = None
    # dilation 1 too, though its dense batch gathers every row: on an H200 (W1, 1M
    # tokens) keeping it on the varlen kernel in place was slower (1.40x the unpacked
    # time against 1.31x, docs/benchmark_details.md)
    if bool(whole.any()) and dense_ok(int(count[whole][0])):
        dense = DenseBlock(int(whole.sum()), int(count[whole][0]))
        order = torch.cat([torch.nonzero(whole).flatten(), torch.nonzero(~whole).flatten()])
        segment_start, count = segment_start[order], count[order]
    ragged = count[dense.num_seqs :] if dense is not None else count
    seqs = None
    if ragged.numel():
        cu = torch.zeros(ragged.numel() + 1, dtype=torch.int64)
        torch.cumsum(ragged, 0, out=cu[1:])
        seqs = PackedSequences(
            cu.to(device=device, dtype=torch.int32), tuple(ragged.tolist()), int(ragged.max())
        )
    if r == 1 and not in_place and (dense is None or seqs is None):  # offset 0: every token, in order
        return None, dense, seqs, in_place
    first = torch.cumsum(count, 0) - count
    num_rows = int(count.sum())
    # row i of segment s is position segment_start[s] + offset + r * (i - first[s])
    base = (segment_start + offset - r * first).to(device)
    rows = torch.repeat_interleave(base, count.to(device), output_size=num_rows)
    return rows + r * torch.arange(num_rows, device=device), dense, seqs, in_place


_CALLS: BoundedCache[list[PackedCall]] = BoundedCache(64)


def head_chunk(num_heads: int) -> int:
    """Query heads per problem: a quarter of them, so that the gathered copies of
    one problem's operands, outputs and gradients stay near two
    ``(total, heads, head_dim)`` tensors ("all" mode on 1M tokens and 32 heads ran
    out of the H200's memory with every head in one problem)."""
    return max(1, -(-num_heads // 4))


def packed_calls(
    bounds: tuple[int, ...],
    pattern: DilatedPattern,
    num_heads: int,
    kv_heads: int,
    device: torch.device,
    dense_ok: Callable[[int], bool] | None = None,
    key: Hashable = None,
) -> list[PackedCall]:
    """Every problem of the pattern on the documents ``bounds``; ``dense_ok``:
    whether whole segments of a length run on the dense kernel (None: never).
    Kept under ``key`` (the backward and the next step of a fixed packing ask again)."""

    def build() -> list[PackedCall]:
        calls = []
        for branch, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
            for offset, heads in pattern.branch_heads(branch, num_heads):
                found = _branch_rows(bounds, w, r, offset, device, dense_ok or (lambda length: False))
                if found is None:
                    continue
                rows, dense, seqs, docs = found
                # only the head fields of these calls count
                if rows is not None or dense is not None or seqs is not None:
                    # at most `chunk` heads each: every call gathers copies of its rows
                    chunk = head_chunk(num_heads)
                    pieces = [
                        BranchCall(
                            branch, offset, r, 0, w, 1, 1, heads[i], heads.step, len(heads[i : i + chunk])
                        )
                        for i in range(0, len(heads), chunk)
                    ]
                    for part in split_for_kv(pieces, num_heads, kv_heads):
                        kv, group = kv_call(part, num_heads, kv_heads)
                        calls.append(PackedCall(part, kv, group, rows, dense, seqs))
                if docs:  # the documents read in place copy nothing: all the heads at once
                    every_head = BranchCall(
                        branch, offset, r, 0, w, 1, 1, heads.start, heads.step, len(heads)
                    )
                    count = selected_count(w, r, offset)
                    for part in split_for_kv([every_head], num_heads, kv_heads):
                        kv, group = kv_call(part, num_heads, kv_heads)
                        in_place = tuple(
                            dataclasses.replace(part, start=start, num_segments=n, length=count)
                            for start, n in docs
                        )
                        calls.append(PackedCall(part, kv, group, None, None, None, in_place))
        return calls

    return _CALLS.get((bounds, pattern, num_heads, kv_heads, device, key, IN_PLACE_MIN_ROWS), build)


def _take(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(dest: Tensor, rows: Tensor | None, part: Tensor, add: bool) -> None:
    """``part`` into ``dest`` (a strided view) at ``rows``: added, or copied where
    no other problem writes the same (row, head); in ``dest``'s dtype, converted
    inside the kernel where it can be (no converted copy of ``part``)."""
    if rows is None:
        dest.add_(part) if add else dest.copy_(part)
    elif add:
        add_at_rows(dest, rows, part)
    else:
        dest.index_copy_(0, rows, part.to(dest.dtype))


def _piece_rows(rows: Tensor | None, piece: slice) -> Tensor | None:
    # rows is None only for a call of one piece (every row, in order)
    return None if rows is None else rows[piece]


def _operands(
    call: PackedCall, chosen: PackedKernels, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(q, k, v, repeats)``: the call's rows and heads in the kernels' layout;
    key/value repeated per query head (``repeats`` of them) only for a kernel
    that does not take them shared."""
    rule = chosen.strides
    q = rule.conform(_take(head_view(query, call.heads), call.rows))
    k, v = (rule.conform(_take(head_view(x, call.kv), call.rows)) for x in (key, value))
    return (q, *shared_kv(chosen.shares_kv, k, v, call.group))


def _in_place_operands(
    call: PackedCall, doc: BranchCall, chosen: PackedKernels, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(q, k, v, repeats)`` of one long document's whole segments (``doc``, one of
    ``call.in_place``): problem views ``(segments, heads, length, d)`` of the packed
    tensors, as the unpacked path reads them; key/value repeated per query head
    only for a dense kernel that does not take them shared."""
    assert chosen.dense is not None
    rule = chosen.dense.strides
    q = rule.conform(problem_view(query[None], doc))
    k, v = (rule.conform(problem_view(x[None], call.kv_of(doc))) for x in (key, value))
    return (q, *shared_kv(chosen.dense.SUPPORTS_GQA, k, v, call.group))


def _forward_pieces(
    call: PackedCall, chosen: PackedKernels, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> list[tuple[slice, Tensor, Tensor]]:
    """``(rows of the call, out, lse)`` of each piece: out ``(rows, heads, d)``, lse ``(rows, heads)``."""
    found = []
    for piece, dense in call.pieces():
        if dense is not None:
            assert chosen.dense is not None
            bq, bk, bv = (dense.batch(x) for x in (q, k, v))
            out, lse, _ = chosen.dense.forward(bq, bk, bv, None, causal, scale)
            found.append((piece, dense.rows_of(out), dense.rows_of(lse[..., None])[..., 0]))
        else:
            assert call.seqs is not None
            pq, pk, pv = (x[piece] for x in (q, k, v))
            out, lse, _ = chosen.varlen.forward_varlen(pq, pk, pv, call.seqs, causal, scale)
            found.append((piece, out, lse))
    return found


def packed_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    calls: list[PackedCall],
    chosen: PackedKernels,
    merge: bool,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: out ``(total, heads, head_dim)``, lse ``(total, heads)``
    float32 (float64 for float64 inputs), -inf where a (position, head) has no branch."""
    num_rows, h, _ = query.shape
    acc_dtype = accumulation_dtype(query.dtype)
    out = query.new_zeros((num_rows, h, value.shape[2]), dtype=acc_dtype if merge else query.dtype)
    lse = query.new_full((num_rows, h), float("-inf"), dtype=acc_dtype)
    # "all": out and lse hold an online merge's weighted sum and largest lse
    weights = query.new_zeros((num_rows, h), dtype=acc_dtype) if merge else None
    for call in calls:
        for doc in call.in_place:
            assert chosen.dense is not None
            q, k, v, _ = _in_place_operands(call, doc, chosen, query, key, value)
            part_out, part_lse, _ = chosen.dense.forward(q, k, v, None, causal, scale)
            part_out, part_lse = from_problem(part_out, 1), from_problem(part_lse, 1)
            if weights is None:
                copy_rows(strided(out[None], doc), part_out)
                strided(lse[None], doc).copy_(part_lse)
            else:
                acc, top, total = (strided(x[None], doc) for x in (out, lse, weights))
                merge_into(acc, top, total, part_out, part_lse)
        if not call.pieces():
            continue
        q, k, v, _ = _operands(call, chosen, query, key, value)
        for piece, part_out, part_lse in _forward_pieces(call, chosen, q, k, v, causal, scale):
            rows = _piece_rows(call.rows, piece)
            if weights is None:
                _put(head_view(out, call.heads), rows, part_out, add=False)
                _put(head_view(lse, call.heads), rows, part_lse, add=False)
                continue
            # 5-D views (1, 1, rows, heads[, d]), merged at the call's rows in one pass
            acc, top, total = (head_view(x, call.heads)[None, None] for x in (out, lse, weights))
            merge_into(acc, top, total, part_out[None, None], part_lse[None, None], rows)
    if weights is not None:
        out, lse = merge_finish(out, lse, weights)
    return out.to(query.dtype), lse


def packed_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    calls: list[PackedCall],
    chosen: PackedKernels,
    merge: bool,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`packed_forward`, in the inputs' shapes and dtypes:
    each kernel's backward with the merged output and lse (kernel states replayed:
    there is no dropout here)."""
    acc_dtype = accumulation_dtype(query.dtype)
    # a key/value (row, head) gets several problems' gradients: "all", or query heads sharing it
    shared = merge or key.shape[1] != query.shape[1]
    dq = query.new_zeros(query.shape, dtype=acc_dtype if merge else query.dtype)
    dk, dv = (x.new_zeros(x.shape, dtype=acc_dtype if shared else x.dtype) for x in (key, value))
    rule = chosen.strides
    saved = (grad_out, query, key, value, out, lse)
    for call in calls:
        for doc in call.in_place:
            _in_place_backward(call, doc, chosen, saved, (dq, dk, dv), (merge, shared, shared), causal, scale)
        if not call.pieces():
            continue
        q, k, v, repeats = _operands(call, chosen, query, key, value)
        do, o = (rule.conform(_take(head_view(x, call.heads), call.rows)) for x in (grad_out, out))
        call_lse = _take(head_view(lse, call.heads), call.rows)
        for piece, dense in call.pieces():
            p_do, p_q, p_k, p_v, p_o = (x[piece] for x in (do, q, k, v, o))
            if dense is not None:
                assert chosen.dense is not None
                state = chosen.dense.replay_state(dense.length, q.device)
                b_do, b_q, b_k, b_v, b_o = (dense.batch(x) for x in (p_do, p_q, p_k, p_v, p_o))
                part_lse = dense.batch(call_lse[piece][..., None])[..., 0]
                grads = chosen.dense.backward(b_do, b_q, b_k, b_v, b_o, part_lse, None, causal, scale, state)
                part_dq, part_dk, part_dv = (dense.rows_of(x) for x in grads)
            else:
                assert call.seqs is not None
                part_dq, part_dk, part_dv = chosen.varlen.backward_varlen(
                    p_do, p_q, p_k, p_v, p_o, call_lse[piece], call.seqs, causal, scale, None
                )
            part_dk, part_dv = kv_grads((part_dk, part_dv), repeats)
            rows = _piece_rows(call.rows, piece)
            _put(head_view(dq, call.heads), rows, part_dq, add=merge)
            _put(head_view(dk, call.kv), rows, part_dk, add=shared)
            _put(head_view(dv, call.kv), rows, part_dv, add=shared)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def _in_place_backward(
    call: PackedCall,
    doc: BranchCall,
    chosen: PackedKernels,
    saved: tuple[Tensor, ...],
    grads: tuple[Tensor, Tensor, Tensor],
    add: tuple[bool, bool, bool],
    causal: bool,
    scale: float,
) -> None:
    """The backward of one long document's whole segments, written into ``grads``
    (dq, dk, dv) in place: added where other problems write the same (row, head).
    ``saved``: ``(grad_out, query, key, value, out, lse)`` of :func:`packed_backward`."""
    grad_out, query, key, value, out, lse = saved
    assert chosen.dense is not None
    q, k, v, repeats = _in_place_operands(call, doc, chosen, query, key, value)
    rule = chosen.dense.strides
    do, o = (rule.conform(problem_view(x[None], doc)) for x in (grad_out, out))
    state = chosen.dense.replay_state(doc.length, q.device)
    part = chosen.dense.backward(do, q, k, v, o, problem_view(lse[None], doc), None, causal, scale, state)
    part_dq, (part_dk, part_dv) = part[0], kv_grads(part[1:], repeats)
    kv_doc = call.kv_of(doc)
    for grad, where, piece, plus in zip(grads, (doc, kv_doc, kv_doc), (part_dq, part_dk, part_dv), add):
        _put(strided(grad[None], where), None, from_problem(piece, 1), plus)


def _setup(
    query: Tensor, key: Tensor, cu_seqlens: Tensor, max_seqlen: int | None, segment_lengths: list[int],
    dilation_rates: list[int], head_mode: str, head_slice: list[int], varlen_backend: str,
    dense_backend: str | None,
) -> tuple[list[PackedCall], PackedKernels, DilatedPattern]:  # fmt: skip
    bounds = host_bounds(cu_seqlens, query.shape[0], max_seqlen, query.device)
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)
    dense = None if dense_backend is None else kernels.REGISTRY[dense_backend]
    chosen = PackedKernels(kernels.REGISTRY[varlen_backend], dense)
    dense_ok = None
    if dense is not None:
        spec = kernels.AttentionSpec.from_tensor(query)

        def dense_ok(length: int) -> bool:
            return not dense.not_supported_reasons(dataclasses.replace(spec, seq_len=length))

    calls = packed_calls(
        tuple(bounds), pattern, query.shape[1], key.shape[1], query.device, dense_ok, dense_backend
    )
    return calls, chosen, pattern


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
    head_slice: list[int],
    is_causal: bool,
    scale: float,
    varlen_backend: str,
    dense_backend: str | None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of packed documents on the varlen form of ``varlen_backend``
    (whole segments on ``dense_backend``, if given): out ``(total, heads,
    head_dim)``, lse ``(total, heads)`` float32 (float64 for float64 inputs).
    Reads ``cu_seqlens`` on the host (inside the operator, so ``torch.compile``
    sees no graph break)."""
    calls, chosen, pattern = _setup(
        query, key, cu_seqlens, max_seqlen, segment_lengths, dilation_rates, head_mode, head_slice,
        varlen_backend, dense_backend,
    )  # fmt: skip
    return packed_forward(query, key, value, calls, chosen, pattern.merges_branches, is_causal, scale)


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
    head_slice: list[int],
    is_causal: bool,
    scale: float,
    varlen_backend: str,
    dense_backend: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_forward_op`, in the inputs' shapes."""
    calls, chosen, pattern = _setup(
        query, key, cu_seqlens, max_seqlen, segment_lengths, dilation_rates, head_mode, head_slice,
        varlen_backend, dense_backend,
    )  # fmt: skip
    return packed_backward(
        grad_out, query, key, value, out, lse, calls, chosen, pattern.merges_branches, is_causal, scale
    )


varlen_backward_op.register_fake(fake_grads)


def _recompute_for(other: tuple[Any, ...], static: tuple[Any, ...]) -> Recompute:
    (cu_seqlens,) = other
    _, segment_lengths, dilation_rates, head_mode, head_slice, is_causal, scale, *_ = static
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)

    def recompute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bounds = host_bounds(cu_seqlens, q.shape[0], None, q.device)
        return grouped_by_length(q, k, v, bounds, _gathered(pattern, is_causal, scale))

    return recompute


# after query, key, value: cu_seqlens
register_operator_autograd(varlen_forward_op, varlen_backward_op, 4, _recompute_for)


def _gathered(
    pattern: DilatedPattern, is_causal: bool, scale: float
) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """One group of equal-length documents on the gather path (plain torch ops)."""

    def attention(q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None) -> Tensor:
        bias = None
        if padding is not None and not is_causal:
            bias = mask_to_bias(padding, accumulation_dtype(q.dtype), "key_padding_mask")
        return gathered_attention(q, k, v, bias, None, pattern, is_causal, scale)

    return attention


def packed_backend(query: Tensor, value: Tensor, backend: str | None) -> PackedKernels | None:
    """The kernels that run packed documents, or None where the groups of equal
    length should (:mod:`.varlen`). A native varlen kernel is taken, with the
    dense kernel the registry prefers running the whole segments where that is
    another one (cuDNN beside SDPA's flash kernel: whole segments are most rows);
    a padded varlen form only where it is the kernel the groups would use anyway
    (fewer calls, the same kernel). A named ``backend`` runs everything it takes."""
    if value.shape[-1] != query.shape[-1]:
        return None
    names = _packed_backend_names(query.device, query.dtype, query.shape[-1], backend)
    if names is None:
        return None
    return PackedKernels(kernels.REGISTRY[names[0]], None if names[1] is None else kernels.REGISTRY[names[1]])


def _packed_backend_names(
    device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None
) -> tuple[str, str | None] | None:
    # a constant of the installed kernels: torch.compile runs it once, traces none of it
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    spec = kernels.AttentionSpec(device.type, dtype, head_dim, compute_capability=cc)
    varlen = dataclasses.replace(spec, varlen=True)
    if backend is not None:
        named = kernels.REGISTRY.get(backend)
        return (backend, None) if named is not None and not named.not_supported_reasons(varlen) else None
    try:
        chosen = kernels.select_backend(varlen)
    except ValueError:
        return None
    dense = kernels.select_backend(spec)
    if chosen is dense:
        return chosen.name, None
    if chosen.VARLEN == "native":
        return chosen.name, dense.name
    return None


# what torch.compiler.assume_constant_result sets (torch.compile calls it once and
# traces none of it), without importing torch._dynamo at `import dilated_attention_pytorch`
_packed_backend_names._dynamo_marked_constant = True  # type: ignore[attr-defined]


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    chosen: PackedKernels,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of packed documents through the registered operators."""
    return varlen_forward_op(  # type: ignore[no-any-return]
        query,
        key,
        value,
        cu_seqlens,
        max_seqlen,
        *pattern.op_args(),
        is_causal,
        float(scale),
        chosen.varlen.name,
        None if chosen.dense is None else chosen.dense.name,
    )


__all__ = [
    "PackedCall",
    "PackedKernels",
    "packed_attention",
    "packed_backend",
    "packed_calls",
    "varlen_backward_op",
]
