"""Which segments of a branch lie in this rank's shard and which span shards:
their members, this rank's selected rows, and the spanning problems."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from ..pattern import BranchCall
from ..sparse.block_layout import BlockLayout
from .all_gather import GatheredRows
from .balance import plan_balance
from .rotation import RotatingRows
from .sparse_rows import PLANS, SparseRows, sparse_plan


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    return [
        dist.get_global_rank(group, r) if group is not None else r for r in range(dist.get_world_size(group))
    ]


def selection(call: BranchCall, segment: int, member: int, shard: int) -> tuple[int, int]:
    """(first selected index inside ``member``'s shard, how many) for one segment."""
    shard_start = member * shard - (call.start + segment * call.segment_length)
    first = (call.offset - shard_start) % call.dilation
    return first, len(range(first, shard, call.dilation))


@dataclasses.dataclass
class Span:
    """This rank's part of one segment that spans shards."""

    call: BranchCall  # the global call
    local: BranchCall  # this rank's selected queries, as a call on the shard
    keys: GatheredRows | SparseRows | RotatingRows
    query_start: int  # sequence position of the first selected query


def segment_members(call: BranchCall, rank: int, shard: int) -> tuple[int, list[int]] | None:
    """The segment of a spanning ``call`` that ``rank``'s shard lies in and the
    ranks that share it, in sequence order; None if the shard is outside the call."""
    w = call.segment_length
    my_start = rank * shard
    if not (call.start <= my_start < call.start + call.num_segments * w):
        return None
    segment = (my_start - call.start) // w
    first_member = (call.start + segment * w) // shard
    return segment, list(range(first_member, first_member + w // shard))


def row_positions(call: BranchCall, segment: int, member: int, shard: int, device: torch.device) -> Tensor:
    """Sequence positions of ``member``'s selected rows of one segment."""
    first, count = selection(call, segment, member, shard)
    return member * shard + first + call.dilation * torch.arange(count, device=device)


def spans(
    calls: list[BranchCall],
    rank: int,
    group: dist.ProcessGroup | None,
    shard: int,
    device: torch.device,
    layout: BlockLayout | None = None,
    causal: bool = False,
    rotate: bool = False,
) -> list[Span]:
    """Every member of a segment meets it at the same call, so collectives match.
    ``rotate``: the keys rotate among the members instead of being gathered."""
    ranks = group_ranks(group)
    found = []
    for tag, call in enumerate(calls):
        found_segment = segment_members(call, rank, shard)
        if found_segment is None:
            continue
        segment, members = found_segment
        my_start = rank * shard
        first, count = selection(call, segment, rank, shard)
        local = dataclasses.replace(
            call, start=0, offset=first, segment_length=shard, num_segments=1, length=count
        )
        me = members.index(rank)
        keys: GatheredRows | SparseRows | RotatingRows
        peers = [ranks[j] for j in members]
        if layout is None:
            counts = [selection(call, segment, j, shard)[1] for j in members]
            positions = torch.cat([row_positions(call, segment, j, shard, device) for j in members])
            balance = plan_balance(counts, me, peers, group, tag) if causal else None
            keys = GatheredRows(group, peers, me, counts, positions, tag, balance)
            if rotate:
                keys = RotatingRows(keys, group, peers, tag, balance)
        else:
            plan_key = (call, segment, rank, shard, causal, layout.block_size)
            member_positions = [row_positions(call, segment, j, shard, device) for j in members]
            send, recv, positions = PLANS.get(
                layout.cache_owner,
                plan_key,
                functools.partial(sparse_plan, call, member_positions, me, layout, causal),
            )
            keys = SparseRows(group, peers, me, count, send, recv, positions, tag)
        found.append(Span(call, local, keys, my_start + first))
    return found


def local_calls(calls: list[BranchCall], rank: int, shard: int) -> list[BranchCall]:
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
