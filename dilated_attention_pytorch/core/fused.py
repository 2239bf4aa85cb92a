"""The fused path: every branch problem a strided view, one lse-returning kernel
call each, results written in place, and a custom autograd Function whose
backward calls each kernel's backward with the merged output and lse."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from .._checks import accumulation_dtype
from ..pattern import (
    BranchCall,
    BranchRows,
    DilatedPattern,
    compact_rows,
    kv_call,
    split_for_kv,
    split_heads,
    tiles_regions,
    whole_branch,
)
from .bias import rows_with_keys, sanitize
from .blockwise import BlockBackward, blockwise_forward, kv_grads, shared_kv
from .exchange import KeyExchange
from .merge import BranchBuffers, merge_branches, merge_finish, merge_into
from .place import place_result
from .views import copy_rows, from_problem, problem_view, stacked_view, strided


@dataclasses.dataclass
class FusedProblem:
    """One branch problem of the fused path. ``call`` places the queries (and
    the output) in the local sequence; keys and values are the same positions,
    or, with an ``exchange``, the segment's rows on every rank that shares it
    (one segment per problem). Those run block by block, one block per member:
    ``bias`` (key padding only) covers all members' keys, and ``causal`` means
    no key of a later member and causal within a member's own block."""

    call: BranchCall
    backend: kernels.Backend
    bias: Tensor | None = None
    causal: bool = False
    exchange: KeyExchange | None = None


def _kv_views(
    p: FusedProblem, kv: BranchCall, group: int, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, int]:
    """``(k, v, group)``: key/value problem views of ``kv`` (:func:`kv_call` of a
    part of :func:`split_for_kv`, ``group`` query heads per key/value head), as
    :func:`shared_kv` gives them to the problem's backend."""
    k, v = (p.backend.strides.conform(problem_view(x, kv)) for x in (key, value))
    return shared_kv(p.backend.SUPPORTS_GQA, k, v, group)


def _into_place(p: FusedProblem, x: Tensor, call: BranchCall) -> Tensor | None:
    """``x``'s problem view of ``call`` for a backend to write into, where that is
    exact: a local problem without bias, a backend with ``forward_into``, and a view
    (not a copy) of ``x``. ``x`` must not be shared with another problem's
    (position, head): grouped-head outputs, or one branch's compact buffer."""
    if p.exchange is not None or p.bias is not None or not p.backend.WRITES_INTO_PLACE:
        return None
    view = problem_view(x, call)
    is_view = view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    return view if is_view and p.backend.strides.accepts(view) else None


def _write(grad: Tensor, call: BranchCall, first_head: int, part5: Tensor, merge: bool, placed: bool) -> None:
    if merge:
        strided(grad, call, first_head).add_(part5)
    elif placed:  # grouped: the call's whole region, zeros included
        place_result(grad, None, call, part5, first_head=first_head)
    else:  # grouped: problems are disjoint in (position, head)
        copy_rows(strided(grad, call, first_head), part5)


#: elements of a result per problem below which grouped results are a zero fill and
#: copies, not region passes: each pass is a Triton launch, dearer on the host than
#: the copies, and at such sizes an eager step waits on the host, not on the GPU
#: (measured on an H200: docs/benchmark_details.md). Under CUDA-graph capture there
#: is no host time per launch, so the passes are used at any size.
PLACE_MIN_ELEMENTS = 1 << 24


def _places(problems: Sequence[FusedProblem], pattern: DilatedPattern, query: Tensor) -> bool:
    """Whether grouped-head results are written region by region (:func:`place_result`),
    with no zero fill first: where the problems' regions cover the result exactly, no
    backend writes into place (such a backend writes the selected rows only), and
    the problems are large (:data:`PLACE_MIN_ELEMENTS`) or the step is captured."""
    b, n, h, d = query.shape
    return (
        not pattern.merges_branches
        and not any(p.backend.WRITES_INTO_PLACE for p in problems)
        and (b * n * h * d >= PLACE_MIN_ELEMENTS * len(problems) or _capturing(query))
        and tiles_regions([p.call for p in problems], n, h)
    )


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


#: bytes the "all"-mode backward may hold beyond the 1.6-unit rule of
#: :func:`merge_head_chunk`: at short lengths that rule leaves a few heads per chunk
#: and the backward bound by the host time of its many small kernel calls (W1 at
#: 32K on an H200: 2.0x faster with all 12 heads in one chunk,
#: ``benchmarks/results/h200_ab_backward_chunk_slack.json``), for memory no GPU misses
BACKWARD_CHUNK_SLACK_BYTES = 1 << 30


def merge_head_chunk(
    num_heads: int, rows_per_position: float, unit_bytes: int = 0, call_units: float = 5.0
) -> int:
    """Heads per chunk of the "all"-mode backward. A chunk of ``c`` heads keeps, in
    units of one ``(batch, seq, heads, head_dim)`` tensor (``unit_bytes`` each), every
    branch's dq, dk, dv in compact rows (3·u·c/h, ``u = rows_per_position``: the
    branches' rows per position, about Σ 1/r; 2.0 for LongNet's base pattern), and
    what one backward call holds beside them (``call_units``·c/h, :func:`_call_units`):
    its float32 dq workspace (2/r), and its dq, dk, dv (3/r) where they are not the
    adopted branch's rows: 5 where a dilation-1 branch is not adopted.
    Keeping that under 1.6 units holds the forward+backward peak within
    1.25× of q, k, v, out and their gradients (measured on an H100:
    ``tests/test_gpu.py::test_peak_memory_within_target``); the price is more,
    smaller backward calls. Where chunks of at least half the heads hold no more
    than :data:`BACKWARD_CHUNK_SLACK_BYTES` (short sequences), they take as many
    heads as that allows: a peak of at most 1.25× plus the slack, and at most
    two chunks of calls. Smaller chunks saved too little time on the H200 to pay
    for their memory (``benchmarks/results/h200_ab_backward_chunk_slack_sizes.json``).
    The slack's bytes count every call's results as copied (5 units), so that it
    reaches the lengths it reached before ``call_units`` was counted (W1: to 64K).
    The forward needs no chunks: its compact results (``u`` units) are live while
    no gradient is."""
    per_head = (3 * rows_per_position + call_units) / num_heads  # units a chunk holds per head
    by_ratio = int(1.6 / per_head)
    most_per_head = (3 * rows_per_position + 5) / num_heads
    by_slack = int(BACKWARD_CHUNK_SLACK_BYTES / (most_per_head * unit_bytes)) if unit_bytes else 0
    if 2 * by_slack < num_heads:
        by_slack = 0
    return max(1, min(num_heads, max(by_ratio, by_slack)))


def _call_units(problems: Sequence[FusedProblem], rows: dict[int, BranchRows], adopted: int | None) -> float:
    """The most units (per head of a chunk, over all heads) that one backward call of
    ``problems`` holds beside the compact rows: the float32 dq workspace of a call of
    dilation ``r`` (2/r, cuDNN), and its dq, dk, dv (3/r) unless they are the adopted
    branch's rows, already counted. A kernel that writes into place is charged as a
    copy: its workspace was not measured (FlashAttention-4 "all" peaks ran higher)."""
    most = 0.0
    for p in problems:
        most = max(most, (2.0 if p.call.branch == adopted else 5.0) / rows[p.call.branch].dilation)
    return most


def _backward_pieces(
    problems: Sequence[FusedProblem], num_heads: int, chunk: int
) -> list[tuple[range, list[tuple[int, BranchCall]]]]:
    """Per chunk of ``chunk`` heads: ``(problem index, the part of its call in the
    chunk)``, spanning problems first (their reductions overlap the rest)."""
    chunks: list[tuple[range, list[tuple[int, BranchCall]]]] = [
        (range(s, min(s + chunk, num_heads)), []) for s in range(0, num_heads, chunk)
    ]
    for i in sorted(range(len(problems)), key=lambda i: problems[i].exchange is None):
        call = problems[i].call
        for piece in [call] if chunk >= num_heads else split_heads([call], chunk):
            chunks[piece.head_start // chunk][1].append((i, piece))
    return chunks


def _bias_heads(bias: Tensor | None, call: BranchCall, piece: BranchCall) -> Tensor | None:
    """``bias`` of ``call`` restricted to the heads of ``piece`` (a part of it)."""
    if bias is None or bias.shape[1] == 1 or piece.num_heads == call.num_heads:
        return bias
    first = (piece.head_start - call.head_start) // call.head_step
    return bias[:, first : first + piece.num_heads]


def _adopted_in_chunk(
    adopted: int | None,
    pieces: Sequence[tuple[int, BranchCall]],
    heads: range,
    num_heads: int,
    kv_heads: int,
) -> int | None:
    """The forward's adopted branch where, in this backward chunk, one kernel call
    of it covers the chunk's heads (its gradients are then the branch's compact rows)."""
    calls = [piece for _, piece in pieces if piece.branch == adopted]
    if adopted is None or len(calls) != 1:
        return None
    parts = split_for_kv(calls, num_heads, kv_heads)
    whole = parts == calls and calls[0].head_start == heads.start and calls[0].num_heads == len(heads)
    return adopted if whole and calls[0].head_step == 1 else None


@dataclasses.dataclass
class FusedRun:
    """What a forward leaves for its backward besides the saved tensors."""

    problems: list[FusedProblem]
    states: list[Any]
    exchanged_kv: list[tuple[Tensor, Tensor] | None]
    rows: dict[int, BranchRows] | None
    merge: bool
    scale: float
    head_chunk: int
    #: grouped heads: results written region by region (:func:`_places`)
    placed: bool
    #: "all": the branch merged from its one problem's results, not compact rows
    adopted: int | None = None


def _merge_layout(
    problems: Sequence[FusedProblem], pattern: DilatedPattern, query: Tensor
) -> tuple[dict[int, BranchRows] | None, int, int | None]:
    """The compact rows of "all" mode (None unless every problem is local and they
    fill them), the backward's heads per chunk, and the branch whose one problem's
    results the merges read in place of compact rows (:func:`~.pattern.whole_branch`;
    not where its kernel writes into place: it writes the rows themselves), for
    ``query`` ``(b, n, h, d)``."""
    seq_len, num_heads = query.shape[1], query.shape[2]
    local = all(p.exchange is None for p in problems)
    calls = [p.call for p in problems]
    rows = compact_rows(pattern, calls, seq_len, num_heads) if local else None
    if rows is None:
        return None, num_heads, None
    per_position = sum(r.num_rows for r in rows.values()) / seq_len
    adopted = whole_branch(rows, calls, num_heads)
    if any(p.backend.WRITES_INTO_PLACE for p in problems if p.call.branch == adopted):
        adopted = None
    unit_bytes = query.numel() * query.element_size()
    chunk = merge_head_chunk(num_heads, per_position, unit_bytes, _call_units(problems, rows, adopted))
    return rows, chunk, adopted


def replayed_run(
    problems: list[FusedProblem], pattern: DilatedPattern, query: Tensor, scale: float
) -> FusedRun:
    """The :class:`FusedRun` a forward of local, dropout-free problems on ``query``
    leaves, rebuilt without it: the backward of a registered operator gets only tensors."""
    rows, head_chunk, adopted = _merge_layout(problems, pattern, query)
    states = [p.backend.replay_state(p.call.length, query.device) for p in problems]
    placed = _places(problems, pattern, query)
    return FusedRun(
        problems,
        states,
        [None] * len(problems),
        rows,
        pattern.merges_branches,
        scale,
        head_chunk,
        placed,
        adopted,
    )


def fused_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    problems: list[FusedProblem],
    pattern: DilatedPattern,
    scale: float,
) -> tuple[Tensor, Tensor, FusedRun]:
    """``(out, lse, run)`` of every problem.

    Grouped heads: problems are disjoint in (position, head); their results
    are copied into place, or written there by an :class:`~.kernels.IntoPlaceBackend`.
    "all": each (position, head) merges one term per branch. Where every problem
    is local, each branch's results go to compact rows (:class:`~.pattern.BranchRows`,
    written into place by such a backend) and one pass merges all branches
    (:func:`merge_branches`); problems that span ranks merge one at a time into
    float32 sums. With compact rows the backward goes one chunk of
    :func:`merge_head_chunk` heads at a time (kernel states must not depend on
    the heads), else all heads at once (no spanning problem may be cut)."""
    b, n, h, _ = query.shape
    d = value.shape[3]  # the output's head_dim is the value's
    merge = pattern.merges_branches
    lse_dtype = accumulation_dtype(query.dtype)
    # every problem is a view of the inputs with strides that are multiples of theirs:
    # inputs its kernels take give problems they take, so one check per call
    query, key, value = _conform_inputs(problems, query, key, value)
    kv_heads = key.shape[2]
    rows, head_chunk, adopted = _merge_layout(problems, pattern, query)
    placed = _places(problems, pattern, query)
    if rows is not None:
        parts = BranchBuffers(rows, b, h, d, query.dtype, query.device, adopted)
        part_lses = BranchBuffers(rows, b, h, None, lse_dtype, query.device, adopted)
    if rows is not None or placed:
        out = query.new_empty(b, n, h, d)
        lse = query.new_empty((b, n, h), dtype=lse_dtype)
    else:
        out = query.new_zeros(b, n, h, d, dtype=lse_dtype if merge else query.dtype)
        lse = query.new_full((b, n, h), -math.inf, dtype=lse_dtype)
    # "all" mode one problem at a time: out and lse hold an online merge's acc and top
    total = query.new_zeros((b, n, h), dtype=lse_dtype) if merge and rows is None else None
    # every exchange starts first, and its problem runs last: the rest hides it
    # (the exchanges move key/value heads: a spanning problem is a part of split_for_kv)
    started = {
        i: p.exchange.start_forward(*(problem_view(x, kv_call(p.call, h, kv_heads)[0]) for x in (key, value)))
        for i, p in enumerate(problems)
        if p.exchange is not None
    }
    states: list[Any] = [None] * len(problems)
    exchanged_kv: list[tuple[Tensor, Tensor] | None] = [None] * len(problems)
    for i in sorted(range(len(problems)), key=lambda i: i in started):
        p = problems[i]
        # where the results go: in place, or the branch's compact rows
        to_out, to_lse, to_call = out, lse, p.call
        compact = rows is not None and p.call.branch != adopted
        if rows is not None and compact:
            branch = p.call.branch
            to_out, to_lse = parts.blocks[branch], part_lses.blocks[branch]
            to_call = rows[branch].call_rows(p.call)
        q = problem_view(query, p.call)
        if i in started:
            blocks, exchanged_kv[i] = started[i]()
            rule = p.backend.strides
            blocks = ((m, rule.conform(k), rule.conform(v)) for m, k, v in blocks)
            # consumed even without local queries: the exchange must still happen
            part_out, part_lse, states[i] = blockwise_forward(p, q, blocks, scale)
        else:
            if p.call.length == 0:
                if placed:
                    place_result(out, lse, p.call, None)
                continue
            k, v, _ = _kv_views(p, *kv_call(p.call, h, kv_heads), key, value)
            dest = _into_place(p, to_out, to_call) if compact or not merge else None
            if dest is not None:
                part_lse, states[i] = p.backend.forward_into(q, k, v, p.causal, scale, dest)  # type: ignore[attr-defined]
                strided(to_lse, to_call).copy_(from_problem(part_lse, b))
                continue
            part_out, part_lse, states[i] = p.backend.forward(q, k, v, p.bias, p.causal, scale)
            if p.bias is not None:
                part_out, part_lse = sanitize(part_out, part_lse, rows_with_keys(p.bias, p.causal))
        part_out, part_lse = from_problem(part_out, b), from_problem(part_lse, b)
        if rows is not None and p.call.branch == adopted:
            parts.adopt(part_out)
            part_lses.adopt(part_lse)
            continue
        if placed:
            place_result(out, lse, p.call, part_out, part_lse)
            continue
        out5, lse4 = strided(to_out, to_call), strided(to_lse, to_call)
        if total is not None:
            merge_into(out5, lse4, strided(total, to_call), part_out, part_lse)
        else:
            copy_rows(out5, part_out)
            lse4.copy_(part_lse)
    if rows is not None:
        merge_branches(out, lse, rows, parts, part_lses, range(h))
    if total is not None:
        out, lse = merge_finish(out, lse, total)
    out = out.to(query.dtype)
    return out, lse, FusedRun(problems, states, exchanged_kv, rows, merge, scale, head_chunk, placed, adopted)


def fused_backward(
    run: FusedRun, grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    stacked: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of a :func:`fused_forward`: each kernel's backward with
    the merged output and lse, in the forward's head chunks. ``stacked`` (query,
    key and value of one shape): the three are slices ``[:, :, i]`` of one
    ``(batch, seq, 3, heads, head_dim)`` tensor, as queries, keys and values of one
    projection are."""
    query, key, value = _conform_inputs(run.problems, query, key, value)
    b, n, h, _ = query.shape
    kv_heads = key.shape[2]
    grad_out = grad_out.contiguous()
    rows: dict[int, BranchRows] | None = run.rows
    # grouped heads: zeros where no problem writes, unless every region is written whole
    new = torch.empty if run.merge or run.placed else torch.zeros
    # in query-head space: dq, and dk, dv unless heads share keys; shared keys'
    # gradients sum over query heads and branches into float32 sums
    shared = kv_heads != h
    # the head_dim of dq, dk and dv in query-head space (the value's may differ)
    dims = [query.shape[3]] if shared else [x.shape[3] for x in (query, key, value)]
    if stacked:
        if shared or len(set(dims)) != 1:
            raise ValueError("stacked gradients need query, key and value of one shape")
        grads = list(new(b, n, 3, h, dims[0], dtype=query.dtype, device=query.device).unbind(2))
    else:
        grads = [new(*query.shape[:3], dim, dtype=query.dtype, device=query.device) for dim in dims]
    kv_sums = [x.new_zeros(x.shape, dtype=lse.dtype) for x in (key, value)] if shared else []

    def add_to_kv_sums(parts: Sequence[Tensor], kv_part: BranchCall) -> None:
        for total, part in zip(kv_sums, parts):
            strided(total, kv_part).add_(from_problem(part, b))

    problems: list[FusedProblem] = run.problems
    for heads, pieces in _backward_pieces(problems, h, run.head_chunk):
        # "all": each branch's gradients go to compact rows and are summed at
        # the end of the chunk, or, with spanning problems, summed in float32
        adopted = _adopted_in_chunk(run.adopted, pieces, heads, h, kv_heads)
        compact = (
            [BranchBuffers(rows, b, len(heads), dim, query.dtype, query.device, adopted) for dim in dims]
            if rows is not None
            else []
        )
        accs = grads
        if run.merge and rows is None:
            accs = [query.new_zeros(b, n, len(heads), dim, dtype=lse.dtype) for dim in dims]
        reductions: dict[int, tuple[Callable[[], tuple[Tensor, Tensor]], BranchCall]] = {}
        for i, piece in pieces:
            p, kv = problems[i], run.exchanged_kv[i]
            if p.exchange is None and piece.length == 0:
                if run.placed:  # its region still gets its zeros
                    for grad in grads:
                        place_result(grad, None, piece, None, first_head=heads.start)
                continue
            parts = split_for_kv([piece], h, kv_heads)
            assert p.exchange is None or parts == [p.call], "a spanning problem is one part of split_for_kv"
            for call in parts:
                q, o, do = (problem_view(x, call) for x in (query, out, grad_out))
                group = 1
                kv_part, kv_group = kv_call(call, h, kv_heads)
                if kv is not None:
                    k, v = (p.backend.strides.conform(x) for x in kv)
                else:
                    k, v, group = _kv_views(p, kv_part, kv_group, key, value)
                part_lse = problem_view(lse, call)
                bias = _bias_heads(p.bias, p.call, call)
                if bias is not None:
                    # no key in any branch: every key is masked, so any finite lse gives p = 0
                    part_lse = torch.where(part_lse == -math.inf, 0.0, part_lse)
                dests: list[Tensor | None]
                if rows is not None and call.branch == adopted:
                    dests = [None]
                elif rows is not None:
                    to_call = rows[call.branch].call_rows(call, heads.start)
                    dests = [_into_place(p, c.blocks[call.branch], to_call) for c in compact]
                else:
                    dests = [None if run.merge else _into_place(p, grad, call) for grad in grads]
                if p.exchange is None and not shared and all(x is not None for x in dests):
                    p.backend.backward_into(  # type: ignore[attr-defined]
                        do, q, k, v, o, part_lse, p.causal, run.scale, run.states[i], tuple(dests)
                    )
                    continue
                part_grads: tuple[Tensor, ...]
                if p.exchange is None:
                    part_grads = p.backend.backward(
                        do, q, k, v, o, part_lse, bias, p.causal, run.scale, run.states[i]
                    )
                else:  # dk, dv go home while the rest runs
                    block = BlockBackward.start(p, do, o, part_lse, run.scale, run.states[i])
                    reductions[i] = p.exchange.backward(block, k, v), kv_part
                    part_grads = (block.finish(),)
                if shared:
                    add_to_kv_sums(kv_grads(part_grads[1:], group), kv_part)
                    part_grads = part_grads[:1]
                if rows is not None:
                    for c, part in zip(compact, part_grads):
                        if call.branch == adopted:
                            c.adopt(from_problem(part, b))
                        else:
                            copy_rows(strided(c.blocks[call.branch], to_call), from_problem(part, b))
                    # freed before the next call, which the chunk rule counts alone (_call_units)
                    del part_grads, part
                    continue
                for acc, part in zip(accs, part_grads):
                    _write(acc, call, heads.start, from_problem(part, b), run.merge, run.placed)
        for i, (wait, kv_part) in reductions.items():
            if shared:
                add_to_kv_sums(wait(), kv_part)
                continue
            for acc, part in zip(accs[1:], wait()):
                _write(acc, problems[i].call, heads.start, from_problem(part, b), run.merge, run.placed)
        if rows is not None:
            for grad, c in zip(grads, compact):
                merge_branches(grad[:, :, heads.start : heads.stop], None, rows, c, None, heads)
        elif run.merge:
            for grad, acc in zip(grads, accs):
                grad[:, :, heads.start : heads.stop].copy_(acc)
    if shared:
        dq, dk, dv = grads[0], kv_sums[0].to(key.dtype), kv_sums[1].to(value.dtype)
    else:
        dq, dk, dv = grads
    return dq, dk, dv


class _FusedDilatedAttention(torch.autograd.Function):
    """:func:`fused_forward` / :func:`fused_backward` under autograd (the
    sequence-parallel path; one device runs them through :mod:`.ops`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        problems: list[FusedProblem],
        pattern: DilatedPattern,
        scale: float,
        recompute: Recompute | None,
    ) -> Tensor:
        out, lse, run = fused_forward(query, key, value, problems, pattern, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.run, ctx.recompute = run, recompute
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # grad mode is on in a backward only under create_graph=True (double backward);
        # batched gradients (vmap, is_grads_batched) come as functorch tensors
        if torch.is_grad_enabled() or functorch_active(grad_out):
            grads = recomputed_grads(ctx.recompute, ctx.saved_tensors[:3], ctx.needs_input_grad[:3], grad_out)
            return (*grads, None, None, None, None)
        return (*fused_backward(ctx.run, grad_out, *ctx.saved_tensors), None, None, None, None)


def _conform_inputs(problems: Sequence[FusedProblem], *inputs: Tensor) -> tuple[Tensor, ...]:
    """``inputs`` in a layout every problem's backend takes (a copy only where one refuses)."""
    rule = kernels.StrideRule.strictest(p.backend.strides for p in problems)
    return tuple(rule.conform(x) for x in inputs)


#: ``(query, key, value) -> output`` of the same function in differentiable torch ops
Recompute = Callable[[Tensor, Tensor, Tensor], Tensor]


def functorch_active(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, batched gradients)
    is running or wraps one of ``tensors``: the fused path's in-place strided
    writes have no batching rule, so such calls take the differentiable path."""
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.compiler.is_compiling():  # traced tensors are plain (dynamo handles the transforms)
        return False
    functorch = torch._C._functorch
    # is_grads_batched runs the backward under the legacy vmap, whose tensors are not "wrapped"
    return any(
        functorch.is_functorch_wrapped_tensor(x) or functorch.is_legacy_batchedtensor(x) for x in tensors
    )


def recomputed_grads(
    recompute: Recompute | None, saved: Sequence[Tensor], needed: Sequence[bool], grad_out: Tensor
) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv)`` by differentiating the same function recomputed in plain
    torch ops: exact, and itself differentiable (double backward, gradient
    penalties) and batchable (``is_grads_batched``, ``torch.func``)."""
    if recompute is None:
        raise RuntimeError(
            "double backward (create_graph=True) and batched gradients are not supported through "
            "sequence-parallel dilated attention: its keys come from other ranks. Compute such "
            "gradients on one device (ImprovedDilatedAttention or DilatedAttention)"
        )
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # under create_graph the saved inputs carry their history: the gradients stay
        # functions of them; otherwise fresh leaves suffice
        inputs = [x if create_graph and x.requires_grad else x.detach().requires_grad_(need)
                  for x, need in zip(saved, needed)]  # fmt: skip
        out = recompute(*inputs)
        wanted = [x for x, need in zip(inputs, needed) if need]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph, allow_unused=True))
    result = [next(found) if need else None for need in needed]
    return tuple(
        g if g is not None or not need else torch.zeros_like(x) for g, x, need in zip(result, saved, needed)
    )


def fake_grads(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any) -> tuple[Tensor, ...]:
    """The fake implementation of a backward operator: ``(dq, dk, dv)`` shaped like the inputs."""
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))


def register_operator_autograd(
    forward_op: Any,
    backward_op: Any,
    num_tensors: int,
    recompute_for: Callable[[tuple[Any, ...], tuple[Any, ...]], Recompute],
    stacked_backward_op: Any = None,
) -> None:
    """Link a registered ``forward_op`` returning ``(out, lse)`` to its
    ``backward_op(grad_out, query, key, value, out, lse, *other, *static)``: the
    forward's first ``num_tensors`` arguments are query, key, value and ``other``
    tensors, the rest ``static``. The lse carries no gradient (marked
    non-differentiable). Under double backward or batched gradients the
    backward differentiates ``recompute_for(other, static)`` instead
    (:func:`recomputed_grads`). ``stacked_backward_op`` (same arguments): the
    gradients as one ``(batch, seq, 3, heads, head_dim)`` tensor, taken where
    query, key and value are its three slices (:func:`~.views.stacked_view`), so
    that they reach the projection without a ``torch.stack`` copy
    (:func:`~.unbind.unbind`)."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(*inputs[:num_tensors], *output)
        ctx.static = inputs[num_tensors:]
        # the lse is returned for the caller's information only: no gradient flows through it
        ctx.mark_non_differentiable(output[1])

    def backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        query, key, value = saved[:3]
        other, (out, lse) = saved[3:num_tensors], saved[num_tensors:]
        none = (None,) * (len(other) + len(ctx.static))
        # grad mode is on in a backward only under create_graph=True (double backward);
        # batched gradients (vmap, is_grads_batched) come as functorch tensors
        if torch.is_grad_enabled() or functorch_active(grad_out):
            recompute = recompute_for(other, ctx.static)
            grads = recomputed_grads(recompute, (query, key, value), ctx.needs_input_grad[:3], grad_out)
            return (*grads, *none)
        args = (grad_out, query, key, value, out, lse, *other, *ctx.static)
        if stacked_backward_op is not None and stacked_view((query, key, value), 2) is not None:
            return (*stacked_backward_op(*args).unbind(2), *none)
        return (*backward_op(*args), *none)

    forward_op.register_autograd(backward, setup_context=setup_context)


def select_backends(
    query: Tensor, value: Tensor, calls: Sequence[BranchCall], has_bias: Sequence[bool], backend: str | None
) -> list[kernels.Backend]:
    """A kernel per problem of ``query`` (batch, seq, heads, head_dim). A named backend
    must suit the inputs; a problem whose length it refuses (cuDNN at length 1, say)
    goes to the best one that takes it. "auto" weighs the call's batch·seq tokens
    (``AttentionSpec.tokens``)."""
    tokens = query.shape[0] * query.shape[1]
    spec = kernels.AttentionSpec.from_tensor(query, has_bias=any(has_bias), value=value, tokens=tokens)
    if backend is not None:
        kernels.select_backend(spec, backend)
    named = kernels.REGISTRY.get(backend) if backend is not None else None
    # problems share few (length, bias) pairs: judge each pair once
    by_spec: dict[tuple[bool, int], kernels.Backend] = {}
    chosen = []
    for call, bias in zip(calls, has_bias):
        key = (bias, call.length)
        if key not in by_spec:
            call_spec = dataclasses.replace(spec, has_bias=bias, seq_len=call.length)
            if named is not None and not named.not_supported_reasons(call_spec):
                by_spec[key] = named
            else:
                by_spec[key] = kernels.select_backend(call_spec)
        chosen.append(by_spec[key])
    return chosen


def run_fused(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    problems: list[FusedProblem],
    pattern: DilatedPattern,
    scale: float,
    recompute: Recompute | None = None,
) -> Tensor:
    """The fused path under its autograd Function, kept out of ``torch.compile``
    graphs: the sequence-parallel path, whose exchanges are communication.
    One device runs the registered operators of :mod:`.ops`. ``recompute``: the same
    function in differentiable ops, which double backward and batched gradients
    differentiate (None: they raise)."""
    return _uncompiled_apply()(query, key, value, problems, pattern, scale, recompute)


@functools.cache
def _uncompiled_apply() -> Callable[..., Tensor]:
    # made on first use: torch.compiler.disable imports torch._dynamo (2 s), which
    # `import dilated_attention_pytorch` should not pay for
    return torch.compiler.disable(_FusedDilatedAttention.apply)
