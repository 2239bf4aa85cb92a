"""Sequence-parallel dilated attention over ``torch.distributed``.

Rank ``i`` of a group of ``P`` holds positions ``[i·L, (i+1)·L)`` of the
sequence (``n = P·L``). A branch whose segments fit in a shard runs locally.
A segment spanning ``m`` shards exchanges only its *dilated* keys and values
(1/r of them), among those ``m`` ranks alone: LongNet's all-gather. The
backward of the gather sums the key/value gradients back onto their owners,
so gradients are exact and distributed. Attention runs as plain torch
(``kernels/math.py``) under autograd, like ``DilatedAttention``.

Supported geometry: for every branch, ``min(w, n)`` divides the shard length
``L`` or is a multiple of it (every power-of-two pattern with ``L`` a power
of two). Anything else raises a ``ValueError`` naming the branch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from ..functional import GatheredProblem
from ..pattern import BranchCall, DilatedPattern

_SUBGROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


@dataclasses.dataclass
class _SegmentKeys:
    """The selected rows of one segment, spread over the ranks that share it
    (implements :class:`functional.RemoteKeys`). Shards with fewer rows pad for
    the collective and trim after it."""

    group: dist.ProcessGroup
    index: int  # this rank's place among the members
    counts: list[int]  # selected rows per member, in sequence order

    def gather(self, local: Tensor) -> Tensor:
        width = max(self.counts)
        padded = local.new_zeros(local.shape[0], width, *local.shape[2:])
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in self.counts]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:, :c] for part, c in zip(parts, self.counts)], 1)

    def reduce(self, grad: Tensor) -> Tensor:
        width = max(self.counts)
        stacked = grad.new_zeros(len(self.counts), grad.shape[0], width, *grad.shape[2:])
        for j, piece in enumerate(grad.split(self.counts, dim=1)):
            stacked[j, :, : piece.shape[1]] = piece
        if dist.get_backend(self.group) == dist.Backend.NCCL:
            mine = torch.empty_like(stacked[0])
            dist.reduce_scatter_tensor(mine, stacked, group=self.group)
        else:  # gloo has no reduce-scatter: all-reduce and keep this rank's slice
            dist.all_reduce(stacked, group=self.group)
            mine = stacked[self.index]
        return mine[:, : self.counts[self.index]]


class _GatherRows(torch.autograd.Function):
    """:meth:`_SegmentKeys.gather` under autograd; backward sums gradients home."""

    @staticmethod
    def forward(ctx, local: Tensor, keys: _SegmentKeys) -> Tensor:  # type: ignore[override]
        ctx.keys = keys
        return keys.gather(local)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.keys.reduce(grad.contiguous()), None


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    return [
        dist.get_global_rank(group, r) if group is not None else r for r in range(dist.get_world_size(group))
    ]


def _subgroup(ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """The group of the ranks sharing one segment; only they take part in making it,
    and every member meets its segments in the same (call) order."""
    if ranks not in _SUBGROUPS:
        _SUBGROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _SUBGROUPS[ranks]


def check_shards(query: Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank must hold a shard of the same shape; a mismatch raises on every rank."""
    shape = torch.tensor(query.shape, dtype=torch.int64, device=query.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    seen = sorted({tuple(s.tolist()) for s in shapes})
    if len(seen) > 1:
        raise ValueError(
            "every rank must pass a shard of the same shape (batch, seq / world_size, heads, head_dim); "
            f"got {seen} across the process group"
        )


def _check_geometry(pattern: DilatedPattern, seq: int, shard: int) -> None:
    for i, w in enumerate(pattern.segment_lengths):
        w_eff = min(w, seq)
        if shard % w_eff and w_eff % shard:
            raise ValueError(
                f"segment_lengths[{i}]={w} (effective {w_eff} for seq {seq}) must divide the shard "
                f"length {shard} or be a multiple of it, so segments align with shards"
            )


def _selection(call: BranchCall, segment: int, member: int, shard: int) -> tuple[int, int]:
    """(first selected index inside ``member``'s shard, how many) for one segment."""
    shard_start = member * shard - (call.start + segment * call.segment_length)
    first = (call.offset - shard_start) % call.dilation
    return first, len(range(first, shard, call.dilation))


@dataclasses.dataclass
class _Span:
    """This rank's part of one segment that spans shards."""

    call: BranchCall  # the global call
    local: BranchCall  # this rank's selected queries, as a call on the shard
    keys: _SegmentKeys


def _spans(calls: list[BranchCall], rank: int, group_ranks: list[int], shard: int) -> list[_Span]:
    """Every member of a segment meets it at the same call, so collectives match."""
    spans = []
    for call in calls:
        w = call.segment_length
        my_start = rank * shard
        if not (call.start <= my_start < call.start + call.num_segments * w):
            continue
        segment = (my_start - call.start) // w
        first_member = (call.start + segment * w) // shard
        members = list(range(first_member, first_member + w // shard))
        counts = [_selection(call, segment, j, shard)[1] for j in members]
        first, count = _selection(call, segment, rank, shard)
        local = dataclasses.replace(
            call, start=0, offset=first, segment_length=shard, num_segments=1, length=count
        )
        group = _subgroup(tuple(group_ranks[j] for j in members))
        spans.append(_Span(call, local, _SegmentKeys(group, members.index(rank), counts)))
    return spans


def _span_bias(span: _Span, key_bias: Tensor | None, is_causal: bool, query: Tensor) -> Tensor | None:
    """Padding of the gathered keys and, if causal, each query's place among them:
    ``(batch | 1, 1, count, total)``."""
    keys = span.keys
    total = sum(keys.counts)
    bias = None
    if key_bias is not None:
        local_keys = key_bias[:, span.local.offset :: span.local.dilation]
        bias = keys.gather(local_keys)[:, None, None, :]
    if is_causal:
        count = span.local.length
        q_index = sum(keys.counts[: keys.index]) + torch.arange(count, device=query.device)
        allowed = torch.arange(total, device=query.device)[None, :] <= q_index[:, None]
        causal = torch.zeros(count, total, device=query.device, dtype=functional._bias_dtype(query.dtype))
        causal = causal.masked_fill(~allowed, -math.inf)[None, None]
        bias = causal if bias is None else bias + causal
    return bias


def _local_calls(calls: list[BranchCall], rank: int, shard: int) -> list[BranchCall]:
    """The segments of each call that lie in this shard, as calls on the shard."""
    out = []
    lo_shard, hi_shard = rank * shard, (rank + 1) * shard
    for call in calls:
        w = call.segment_length
        lo, hi = max(call.start, lo_shard), min(call.start + call.num_segments * w, hi_shard)
        if lo >= hi:
            continue
        s_lo, s_hi = (lo - call.start) // w, (hi - call.start) // w
        out.append(
            dataclasses.replace(call, start=call.start + s_lo * w - lo_shard, num_segments=s_hi - s_lo)
        )
    return out


def ring_dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pattern: DilatedPattern,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    method: functional.Method = "fused",
    backend: str | None = None,
) -> Tensor:
    """Dilated attention of a sequence sharded over ``process_group``.

    ``query``, ``key``, ``value``: this rank's shard ``(batch, seq / P, heads, head_dim)``;
    ``key_padding_mask``: its shard ``(batch, seq / P)``. Returns this rank's shard
    of the output of DESIGN.md §1 on the whole sequence. ``method``/``backend``
    as in :func:`functional.dilated_attention` (dropout takes the gather path).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "RingDilatedAttention needs torch.distributed initialized (torchrun, then "
            "torch.distributed.init_process_group)"
        )
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported by the sequence-parallel implementation; use "
            "key_padding_mask and is_causal"
        )
    shape, key_bias, _, scale = functional.validate_call(
        query, key, value, is_causal, key_padding_mask, None, dropout_p, softmax_scale, method
    )
    check_shards(query, process_group)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    b, shard, h, _ = shape
    seq = shard * world
    _check_geometry(pattern, seq, shard)
    calls = pattern.calls(seq, h)
    local = _local_calls([c for c in calls if c.segment_length <= shard], rank, shard)
    spans = _spans([c for c in calls if c.segment_length > shard], rank, _group_ranks(process_group), shard)
    span_biases = [_span_bias(sp, key_bias, is_causal, query) for sp in spans]

    if method == "gather" or dropout_p > 0.0:

        def problems() -> Iterator[GatheredProblem]:
            yield from functional._local_problems(query, key, value, key_bias, None, local, is_causal)
            for sp, bias in zip(spans, span_biases):
                q = functional._as_problem(functional._strided(query, sp.local))
                k, v = (
                    _GatherRows.apply(functional._strided(x, sp.local)[:, 0], sp.keys).transpose(1, 2)
                    for x in (key, value)
                )
                positions = functional._positions(sp.local, query.device).reshape(-1)
                yield GatheredProblem(sp.local, positions, q, k, v, bias, False)

        return functional.run_gathered(query, problems(), pattern, scale, dropout_p, sdpa=method == "fused")

    local_biases = [functional._call_bias(c, key_bias, None, b) for c in local]
    problem_calls = local + [sp.local for sp in spans]
    biases = local_biases + span_biases
    backends = functional.select_backends(query, problem_calls, [x is not None for x in biases], backend)
    problems = [
        functional.FusedProblem(c, be, bias, is_causal) for c, be, bias in zip(local, backends, local_biases)
    ] + [
        functional.FusedProblem(sp.local, be, bias, False, sp.keys)
        for sp, be, bias in zip(spans, backends[len(local) :], span_biases)
    ]
    return functional.run_fused(query, key, value, problems, pattern.head_mode == "all", scale)
