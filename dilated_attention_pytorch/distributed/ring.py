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

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from ..functional import GatheredProblem
from ..pattern import BranchCall, DilatedPattern

_SUBGROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


class _GatherFromGroup(torch.autograd.Function):
    """All-gather along a new leading dim; backward sums each rank's slice back."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, rank: int) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None
        # gloo has no reduce-scatter: all-reduce and keep this rank's slice
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None


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


def _gather_selected(
    part: Tensor, counts: list[int], group: dist.ProcessGroup, index: int, fill: float = 0.0
) -> Tensor:
    """All members' selected rows (dim 1), concatenated in sequence order; shards
    with fewer rows are padded for the collective and trimmed after it."""
    pad = max(counts) - part.shape[1]
    if pad:
        part = torch.cat([part, part.new_full((part.shape[0], pad, *part.shape[2:]), fill)], 1)
    stacked = _GatherFromGroup.apply(part, group, index)
    return torch.cat([stacked[j, :, :c] for j, c in enumerate(counts)], 1)


def _spanning_problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    calls: list[BranchCall],
    is_causal: bool,
    rank: int,
    group_ranks: list[int],
    shard: int,
) -> Iterator[GatheredProblem]:
    """Calls whose segments span shards: local dilated queries against the
    segment's dilated keys/values gathered from the ranks that share it.

    Every member posts the gather even when it has no query of its own, and
    members meet their segments in call order, so collectives always match."""
    device = query.device
    my_start = rank * shard
    for call in calls:
        w = call.segment_length
        if not (call.start <= my_start < call.start + call.num_segments * w):
            continue
        segment = (my_start - call.start) // w
        first_member = (call.start + segment * w) // shard
        members = list(range(first_member, first_member + w // shard))
        counts = [_selection(call, segment, j, shard)[1] for j in members]
        index = members.index(rank)
        group = _subgroup(tuple(group_ranks[j] for j in members))
        first, count = _selection(call, segment, rank, shard)
        local = torch.arange(first, shard, call.dilation, device=device)
        heads = torch.tensor(call.heads(), device=device)

        q = query[:, local][:, :, heads].transpose(1, 2)
        k, v = (
            _gather_selected(x[:, local][:, :, heads], counts, group, index).transpose(1, 2)
            for x in (key, value)
        )
        total = k.shape[2]
        bias = None
        if key_bias is not None:
            bias = _gather_selected(key_bias[:, local], counts, group, index, -math.inf)[:, None, None, :]
        if is_causal:
            # a query sees the selected keys up to its own place among them
            q_index = sum(counts[:index]) + torch.arange(count, device=device)
            allowed = torch.arange(total, device=device)[None, :] <= q_index[:, None]
            causal = torch.zeros(count, total, device=device, dtype=functional._bias_dtype(query.dtype))
            causal = causal.masked_fill(~allowed, -math.inf)
            bias = causal if bias is None else bias + causal
        yield GatheredProblem(call, local, q, k, v, bias, False)


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
) -> Tensor:
    """Dilated attention of a sequence sharded over ``process_group``.

    ``query``, ``key``, ``value``: this rank's shard ``(batch, seq / P, heads, head_dim)``;
    ``key_padding_mask``: its shard ``(batch, seq / P)``. Returns this rank's shard
    of the output of DESIGN.md §1 on the whole sequence.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "RingDilatedAttention needs torch.distributed initialized (torchrun, then "
            "torch.distributed.init_process_group)"
        )
    shape = functional._check_inputs(query, key, value)
    functional._check_scale(softmax_scale)
    functional._check_dropout(dropout_p)
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported by the sequence-parallel implementation; use "
            "key_padding_mask and is_causal"
        )
    check_shards(query, process_group)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    _, shard, h, d = shape
    seq = shard * world
    _check_geometry(pattern, seq, shard)
    key_bias, _ = functional.prepare_masks(key_padding_mask, None, shape, query.dtype, query.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    calls = pattern.calls(seq, h)
    local = [c for c in calls if c.segment_length <= shard]
    spanning = [c for c in calls if c.segment_length > shard]
    group_ranks = _group_ranks(process_group)

    def problems() -> Iterator[GatheredProblem]:
        yield from functional._local_problems(
            query, key, value, key_bias, None, local, is_causal, segment_offset=rank * shard
        )
        yield from _spanning_problems(
            query, key, value, key_bias, spanning, is_causal, rank, group_ranks, shard
        )

    return functional.run_gathered(query, problems(), pattern, scale, dropout_p)
