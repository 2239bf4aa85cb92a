"""Sequence-parallel dilated attention over ``torch.distributed``.

Rank ``i`` of a group of ``P`` holds positions ``[i·L, (i+1)·L)`` of the
sequence (``n = P·L``). A branch whose segments fit in a shard runs locally.
A segment spanning ``m`` shards exchanges only its *dilated* keys and values
(1/r of them), among those ``m`` ranks alone: LongNet's all-gather (started
before the local branches run, so they hide it), or with ``exchange="ring"``
a rotation of one member's block at a time with ``batch_isend_irecv``. The
backward sums the key/value gradients back onto their owners (point to point,
or the gradients rotating with their blocks), so gradients are exact and
distributed. Under causality members ``j`` and ``m - 1 - j`` share the work
evenly: the later one lends its last query rows to the earlier one
(:func:`_balance`). The fused path (``functional.FusedProblem``) runs all of
this; the gather path (dropout) all-gathers and runs plain torch under
autograd, like ``DilatedAttention``.

With a block layout (block-sparse dilated attention) a spanning segment
exchanges rows point to point instead: member ``j`` receives from member ``i``
only the selected rows whose blocks some query of ``j`` may see (none from
later members when causal), so blocks that no rank needs never travel. Every
rank derives the same exchange plan from the layout, which must therefore be
the same on every rank.

Supported geometry: for every branch, ``min(w, n)`` divides the shard length
``L`` or is a multiple of it (every power-of-two pattern with ``L`` a power
of two). Anything else raises a ``ValueError`` naming the branch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from ..functional import BlockLayout, FlexProblem, GatheredProblem
from ..kernels import flex as flex_kernel
from ..pattern import BranchCall, DilatedPattern

Exchange = Literal["all_gather", "ring"]
EXCHANGES: tuple[str, ...] = ("all_gather", "ring")
#: exchange plans of block-sparse spans, keyed by layout and geometry
_PLANS = flex_kernel.BlockMaskCache()


def _waiter(works: list[Any], result: Callable[[], Any]) -> Callable[[], Any]:
    def wait() -> Any:
        for work in works:
            work.wait()
        return result()

    return wait


@dataclasses.dataclass
class _SegmentKeys:
    """The selected rows of one segment, spread over the ranks that share it
    (implements :class:`functional.RemoteKeys`): each member sends its rows to
    every other member point to point, on the caller's group. No subgroup is
    made: creating groups of some ranks only (``new_group(...,
    use_local_synchronization=True)``) names them by a per-rank counter, and
    ranks that had made different numbers of groups hung forever."""

    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    index: int  # this rank's place among the members
    counts: list[int]  # selected rows per member, in sequence order
    positions: Tensor  # sequence positions of the gathered rows
    tag: int  # tells the exchanges of different segments apart (gloo matches by tag): 4·tag + 3

    def _post(self, outgoing: dict[int, Tensor], incoming: dict[int, Tensor]) -> list[Any]:
        tag = 4 * self.tag + 3
        ops = [dist.P2POp(dist.isend, t, self.peers[j], self.group, tag) for j, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[j], self.group, tag) for j, t in incoming.items()]
        return dist.batch_isend_irecv(ops) if ops else []

    def _others(self) -> list[int]:
        return [j for j in range(len(self.counts)) if j != self.index]

    def start_gather(self, local: Tensor) -> Callable[[], Tensor]:
        local = local.contiguous()
        rest = local.shape[2:]
        # a member with no rows sends nothing, and the others know it from counts
        outgoing = {j: local for j in self._others()} if local.shape[1] else {}
        incoming = {j: local.new_empty(local.shape[0], self.counts[j], *rest) for j in self._others()
                    if self.counts[j]}  # fmt: skip
        works = self._post(outgoing, incoming)

        def rows() -> Tensor:
            parts = [local if j == self.index else incoming.get(j) for j in range(len(self.counts))]
            return torch.cat([p for p in parts if p is not None], 1)

        return _waiter(works, rows)

    def start_reduce(self, grad: Tensor) -> Callable[[], Tensor]:
        pieces = grad.split(self.counts, dim=1)
        mine = self.counts[self.index]
        outgoing = {j: pieces[j].contiguous() for j in self._others() if self.counts[j]}
        shape = (grad.shape[0], mine, *grad.shape[2:])
        incoming = {j: grad.new_empty(shape) for j in self._others()} if mine else {}
        works = self._post(outgoing, incoming)

        def summed() -> Tensor:
            total = pieces[self.index].clone()
            for j in sorted(incoming):  # one order on every run: reproducible sums
                total += incoming[j]
            return total

        return _waiter(works, summed)

    def gather(self, local: Tensor) -> Tensor:
        return self.start_gather(local)()

    def reduce(self, grad: Tensor) -> Tensor:
        return self.start_reduce(grad)()


@dataclasses.dataclass
class _RingRows:
    """The selected rows of one segment, rotated among its members with
    ``batch_isend_irecv`` (implements :class:`functional.RingKeys`); ``rows``
    gathers what is small enough to gather whole (the key padding)."""

    rows: _SegmentKeys
    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    tag: int  # tells the exchanges apart (gloo matches by tag): 4·tag + channel

    @property
    def index(self) -> int:
        return self.rows.index

    @property
    def counts(self) -> list[int]:
        return self.rows.counts

    @property
    def positions(self) -> Tensor:
        return self.rows.positions

    def gather(self, local: Tensor) -> Tensor:
        return self.rows.gather(local)

    def start_shift(self, tensors: list[Tensor], member: int, channel: int = 0) -> Callable[[], list[Tensor]]:
        size = len(self.peers)
        after, before = self.peers[(self.index + 1) % size], self.peers[(self.index - 1) % size]
        rows = self.counts[(member - 1) % size]
        incoming = [x.new_empty(*x.shape[:2], rows, *x.shape[3:]) for x in tensors]
        tag = 4 * self.tag + channel
        ops = [dist.P2POp(dist.isend, x.contiguous(), after, self.group, tag) for x in tensors]
        ops += [dist.P2POp(dist.irecv, x, before, self.group, tag) for x in incoming]
        return _waiter(dist.batch_isend_irecv(ops), lambda: incoming)


@dataclasses.dataclass
class _Balance:
    """Causal load balancing between two members of a segment (implements
    :class:`functional.Balance`)."""

    group: dist.ProcessGroup | None
    peer: int  # the partner's global rank
    tag: int  # 4·tag + 2: apart from the ring's channels
    lender: bool
    partner: int
    first: int
    rows: int

    def start_swap(self, outgoing: list[Tensor], incoming: list[Tensor]) -> Callable[[], list[Tensor]]:
        tag = 4 * self.tag + 2
        ops = [dist.P2POp(dist.isend, x, self.peer, self.group, tag) for x in outgoing]
        ops += [dist.P2POp(dist.irecv, x, self.peer, self.group, tag) for x in incoming]
        return _waiter(dist.batch_isend_irecv(ops), lambda: incoming)


def _balance(
    counts: list[int], me: int, peers: list[int], group: dist.ProcessGroup | None, tag: int
) -> _Balance | None:
    """Member ``j`` pairs with ``size - 1 - j``. With ``c`` rows per member, the
    later one's row ``i`` sees ``j·c + i`` keys; keeping its first ``a`` rows with
    ``a²/2 + j·c·a = size·c²/2`` leaves both with half the pair's work."""
    size = len(counts)
    partner = size - 1 - me
    if partner == me:
        return None
    j = max(me, partner)
    c = counts[j]
    first = min(max(round(c * (math.sqrt(j * j + size) - j)), 0), c)
    if first == c:
        return None
    return _Balance(group, peers[partner], tag, me == j, partner, first, c - first)


@dataclasses.dataclass
class _SparseRows:
    """The selected rows of one segment that block-sparse queries need, sent point
    to point (implements :class:`functional.RemoteKeys`): member ``j`` gets from
    this rank only ``send[j]``, and this rank takes ``recv[j]`` of member ``j``'s
    rows. Every member derives the same plan, so sends and receives pair up;
    ranks with nothing to compute still post theirs."""

    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    index: int  # this rank's place among the members
    count: int  # this rank's selected rows
    send: list[Tensor]  # per member: indices of this rank's rows it needs ([index]: those used here)
    recv: list[Tensor]  # per member: indices of its rows this rank needs ([index] = send[index])
    positions: Tensor  # sequence positions of the gathered rows, sorted
    tag: int  # tells the exchanges of different segments apart (gloo matches by tag)

    def _exchange(self, outgoing: dict[int, Tensor], incoming: dict[int, Tensor]) -> None:
        ops = [dist.P2POp(dist.isend, t, self.peers[j], self.group, self.tag) for j, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[j], self.group, self.tag) for j, t in incoming.items()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _others(self, index: list[Tensor]) -> list[tuple[int, Tensor]]:
        return [(j, i) for j, i in enumerate(index) if j != self.index and i.numel()]

    def gather(self, local: Tensor) -> Tensor:
        rest = local.shape[2:]
        outgoing = {j: local[:, i].contiguous() for j, i in self._others(self.send)}
        incoming = {j: local.new_empty(local.shape[0], i.numel(), *rest) for j, i in self._others(self.recv)}
        self._exchange(outgoing, incoming)
        parts = [local[:, i] if j == self.index else incoming.get(j) for j, i in enumerate(self.recv)]
        return torch.cat([p for p in parts if p is not None], 1)

    def reduce(self, grad: Tensor) -> Tensor:
        pieces = grad.split([i.numel() for i in self.recv], dim=1)
        outgoing = {j: pieces[j].contiguous() for j, _ in self._others(self.recv)}
        incoming = {
            j: grad.new_empty(grad.shape[0], i.numel(), *grad.shape[2:]) for j, i in self._others(self.send)
        }
        self._exchange(outgoing, incoming)
        mine = grad.new_zeros(grad.shape[0], self.count, *grad.shape[2:])
        mine.index_add_(1, self.recv[self.index], pieces[self.index])
        for j, received in incoming.items():
            mine.index_add_(1, self.send[j], received)
        return mine


class _GatherRows(torch.autograd.Function):
    """:meth:`_SegmentKeys.gather` under autograd; backward sums gradients home."""

    @staticmethod
    def forward(ctx, local: Tensor, keys: _SegmentKeys) -> Tensor:  # type: ignore[override]
        ctx.keys = keys
        return keys.gather(local)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if torch.is_grad_enabled() or functional.functorch_active(grad):
            # the reduction is communication, not differentiable ops: a silent zero otherwise
            raise RuntimeError(
                "double backward (create_graph=True) and batched gradients are not supported through "
                "sequence-parallel dilated attention: its keys come from other ranks"
            )
        return ctx.keys.reduce(grad.contiguous()), None


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    return [
        dist.get_global_rank(group, r) if group is not None else r for r in range(dist.get_world_size(group))
    ]


def all_gather_cat(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's ``x`` (same shape on all) concatenated along ``dim`` in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a small tensor for a collective on ``group`` lives (NCCL: the current GPU)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_checksum(layout: Tensor) -> Tensor:
    """One int64 that differs, with near certainty, between two different layouts."""
    flat = layout.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 1_000_003
    return (flat * weights).sum().view(1) + flat.numel() * 1_000_003


def check_call(
    query: Tensor,
    group: dist.ProcessGroup | None,
    description: dict[str, Any] | None = None,
    error: Exception | None = None,
    layout: Tensor | None = None,
) -> None:
    """The one check that every rank makes the same call, before any other collective.

    One all-gather of: whether this rank's own arguments were valid (``error``:
    the exception its local checks raised), its shard shape, a fingerprint of
    ``description`` (pattern, dtype, masks present, ...) and of ``layout``. Any
    difference raises on every rank, so no rank waits for a partner that will
    never come: the rank whose arguments were invalid raises its own error, the
    others say which rank it was.
    """
    valid = error is None and isinstance(query, Tensor) and query.dim() == 4
    shape = list(query.shape) if valid else [0, 0, 0, 0]
    fingerprint = zlib.crc32(repr(sorted((description or {}).items())).encode())
    device = _collective_device(group)
    row = torch.tensor([int(valid), *shape, fingerprint], dtype=torch.int64, device=device)
    checksum = _layout_checksum(layout).to(device) if valid and layout is not None else row.new_zeros(1)
    row = torch.cat([row, checksum])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = [r.tolist() for r in rows]
    if error is not None:
        raise error
    refused = [r for r, values in enumerate(table) if not values[0]]
    if refused:
        raise ValueError(
            f"rank(s) {refused} of the process group refused their arguments (the error raised there "
            "says why), so no rank runs this call"
        )
    shapes = sorted({tuple(values[1:5]) for values in table})
    if len(shapes) > 1:
        raise ValueError(
            "every rank must pass a shard of the same shape (batch, seq / world_size, heads, head_dim); "
            f"got {shapes} across the process group"
        )
    if len({values[5] for values in table}) > 1:
        described: list[Any] = [None] * len(table)
        dist.all_gather_object(described, description, group=group)
        keys = sorted({k for d in described for k in (d or {})})
        differ = {k: [(d or {}).get(k) for d in described] for k in keys}
        differ = {k: v for k, v in differ.items() if len({repr(x) for x in v}) > 1}
        raise ValueError(
            "every rank must make the same call; these differ across the ranks (one value per rank): "
            + "; ".join(f"{k}: {v}" for k, v in differ.items())
        )
    if len({values[6] for values in table}) > 1:
        raise ValueError("block_layout must be the same on every rank (the exchange plan is derived from it)")


def check_shards(query: Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank must hold a shard of the same shape; a mismatch raises on every rank."""
    check_call(query, group)


def check_exchange(exchange: str) -> Exchange:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return exchange  # type: ignore[return-value]


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
    keys: _SegmentKeys | _SparseRows | _RingRows
    query_start: int  # sequence position of the first selected query
    balance: _Balance | None = None  # causal load balancing (fused path)


def _row_positions(call: BranchCall, segment: int, member: int, shard: int, device: torch.device) -> Tensor:
    """Sequence positions of ``member``'s selected rows of one segment."""
    first, count = _selection(call, segment, member, shard)
    return member * shard + first + call.dilation * torch.arange(count, device=device)


def _sparse_plan(
    call: BranchCall, segment: int, members: list[int], me: int, shard: int, layout: BlockLayout, causal: bool
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(send, recv, gathered positions) of :class:`_SparseRows`: a member needs a
    row of another when some block of its queries may see the row's block, for
    any batch element or head of the call, and (causal) the row is not later."""
    device = layout.blocks.device
    positions = [_row_positions(call, segment, j, shard, device) for j in members]
    blocks = flex_kernel._call_layout(layout.blocks, call).any(0).any(0)  # (nb, nb)
    sees = [blocks[torch.unique(p // layout.block_size)].any(0) for p in positions]

    def needed(receiver: int, sender: int) -> Tensor:
        if causal and sender > receiver:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.nonzero(sees[receiver][positions[sender] // layout.block_size]).flatten()

    send = [needed(j, me) for j in range(len(members))]
    recv = [needed(me, j) for j in range(len(members))]
    gathered = torch.cat([positions[j][recv[j]] for j in range(len(members))])
    return send, recv, gathered


def _spans(
    calls: list[BranchCall],
    rank: int,
    group: dist.ProcessGroup | None,
    shard: int,
    device: torch.device,
    layout: BlockLayout | None = None,
    causal: bool = False,
    rotate: bool = False,
) -> list[_Span]:
    """Every member of a segment meets it at the same call, so collectives match.
    ``rotate``: the keys rotate among the members instead of being gathered."""
    group_ranks = _group_ranks(group)
    spans = []
    for tag, call in enumerate(calls):
        w = call.segment_length
        my_start = rank * shard
        if not (call.start <= my_start < call.start + call.num_segments * w):
            continue
        segment = (my_start - call.start) // w
        first_member = (call.start + segment * w) // shard
        members = list(range(first_member, first_member + w // shard))
        first, count = _selection(call, segment, rank, shard)
        local = dataclasses.replace(
            call, start=0, offset=first, segment_length=shard, num_segments=1, length=count
        )
        me = members.index(rank)
        keys: _SegmentKeys | _SparseRows | _RingRows
        peers = [group_ranks[j] for j in members]
        balance = None
        if layout is None:
            counts = [_selection(call, segment, j, shard)[1] for j in members]
            positions = torch.cat([_row_positions(call, segment, j, shard, device) for j in members])
            keys = _SegmentKeys(group, peers, me, counts, positions, tag)
            if rotate:
                keys = _RingRows(keys, group, peers, tag)
            if causal:
                balance = _balance(counts, me, peers, group, tag)
        else:
            plan_key = (call, segment, rank, shard, causal, layout.block_size)
            send, recv, positions = _PLANS.get(
                layout.cache_owner,
                plan_key,
                functools.partial(_sparse_plan, call, segment, members, me, shard, layout, causal),
            )
            keys = _SparseRows(group, peers, me, count, send, recv, positions, tag)
        spans.append(_Span(call, local, keys, my_start + first, balance))
    return spans


def _span_bias(
    span: _Span, key_bias: Tensor | None, is_causal: bool, query: Tensor, layout: BlockLayout | None
) -> Tensor | None:
    """Padding of the gathered keys, causality and the block layout between this
    rank's queries and them: ``(batch | 1, heads | 1, count, total)``, or None."""
    keys, local = span.keys, span.local
    parts = []
    if key_bias is not None:
        parts.append(_gathered_key_bias(span, key_bias)[:, None, None, :])
    q_pos = span.query_start + local.dilation * torch.arange(local.length, device=query.device)
    bias_dtype = functional._bias_dtype(query.dtype)
    if is_causal:
        parts.append(
            functional._mask_to_bias(q_pos[:, None] < keys.positions[None, :], bias_dtype)[None, None]
        )
    if layout is not None:
        blocks = flex_kernel._call_layout(layout.blocks, span.call)
        size = layout.block_size
        allowed = blocks[:, :, (q_pos // size)[:, None], (keys.positions // size)[None, :]]
        parts.append(functional._mask_to_bias(~allowed, bias_dtype))
    bias = None
    for part in parts:
        bias = part if bias is None else bias + part
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
    block_layout: Tensor | None = None,
    block_size: int = 128,
    exchange: Exchange = "all_gather",
) -> Tensor:
    """Dilated attention of a sequence sharded over ``process_group``.

    ``query``, ``key``, ``value``: this rank's shard ``(batch, seq / P, heads, head_dim)``;
    ``key_padding_mask``: its shard ``(batch, seq / P)``. Returns this rank's shard
    of the output of DESIGN.md §1 on the whole sequence. ``method``/``backend``
    as in :func:`functional.dilated_attention` (dropout takes the gather path).
    ``block_layout`` (the same on every rank) is over blocks of the *whole*
    sequence, ``n_blocks = ceil(seq / block_size)``, and runs with ``method="flex"``
    or ``"gather"``; ``method="flex"`` without one uses a single block.

    ``exchange``: how a segment spanning shards brings its keys together on the
    fused path. ``"all_gather"`` gathers the segment's selected rows on each of
    its ranks (one collective, hidden behind the local branches); ``"ring"``
    rotates them among those ranks with ``batch_isend_irecv``, each hop under
    the previous block's kernel, and the backward rotates them again, so a rank
    holds two blocks of rows instead of the segment's. The gather and flex paths
    (dropout, ``block_layout``) always gather.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "RingDilatedAttention needs torch.distributed initialized (torchrun, then "
            "torch.distributed.init_process_group)"
        )
    world = dist.get_world_size(process_group)
    # every local check first; then one collective compares the calls of all ranks
    error: Exception | None = None
    layout = None
    try:
        check_exchange(exchange)
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported by the sequence-parallel implementation; use "
                "key_padding_mask and is_causal"
            )
        shape, key_bias, _, scale = functional.validate_call(
            query, key, value, is_causal, key_padding_mask, None, dropout_p, softmax_scale, method
        )
        if functional.functorch_active(query, key, value):
            raise RuntimeError(
                "torch.func transforms (vmap, grad, jacrev) are not supported by sequence-parallel dilated "
                "attention: its keys come from other ranks through communication"
            )
        if method == "flex" and block_layout is None:
            block_layout, block_size = functional._one_block(query.device), shape[1] * world
        if block_layout is not None:
            if method == "fused":
                raise ValueError(
                    "block_layout runs with method='flex' (FlexAttention) or method='gather', not 'fused'"
                )
            layout = functional.prepare_layout(
                block_layout, block_size, shape, query.dtype, query.device, shape[1] * world
            )
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    description = _describe_call(
        query, key, value, pattern, is_causal, key_padding_mask, dropout_p, softmax_scale, method,
        block_layout is not None, block_size, exchange,
    )  # fmt: skip
    check_call(query, process_group, description, error, None if layout is None else layout.blocks)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    b, shard, h, _ = shape
    seq = shard * world
    _check_geometry(pattern, seq, shard)
    if layout is not None:
        layout = dataclasses.replace(layout, offset=rank * shard)
    calls = pattern.calls(seq, h)
    local = _local_calls([c for c in calls if c.segment_length <= shard], rank, shard)
    spanning = [c for c in calls if c.segment_length > shard]
    rotate = exchange == "ring" and method == "fused" and dropout_p == 0.0
    spans = _spans(spanning, rank, process_group, shard, query.device, layout, is_causal, rotate)

    if method == "flex":
        assert layout is not None
        functional.check_flex(query, key, value)
        problems = functional.flex_problems(query, key, value, key_bias, None, local, layout, is_causal)
        return functional.run_flex(
            query,
            itertools.chain(
                problems, _flex_span_problems(query, key, value, key_bias, spans, layout, is_causal)
            ),
            pattern,
            scale,
        )

    if method == "gather" or dropout_p > 0.0:
        span_biases = [_span_bias(sp, key_bias, is_causal, query, layout) for sp in spans]

        def problems() -> Iterator[GatheredProblem]:
            yield from functional._local_problems(query, key, value, key_bias, None, local, is_causal, layout)
            for sp, bias in zip(spans, span_biases):
                q = functional._problem_view(query, sp.local)
                k, v = _gathered_keys(key, value, sp)
                positions = functional._positions(sp.local, query.device).reshape(-1)
                yield GatheredProblem(sp.local, positions, q, k, v, bias, False)

        sdpa = method == "fused" and layout is None
        return functional.run_gathered(query, problems(), pattern, scale, dropout_p, sdpa=sdpa)

    # block by block, one block per member: causality is the kernels' (see FusedProblem)
    span_biases = [_span_bias(sp, key_bias, False, query, None) for sp in spans]
    local_biases = [functional._call_bias(c, key_bias, None, b) for c in local]
    problem_calls = local + [sp.local for sp in spans]
    biases = local_biases + span_biases
    backends = functional.select_backends(query, problem_calls, [x is not None for x in biases], backend)
    fused = [
        functional.FusedProblem(c, be, bias, is_causal) for c, be, bias in zip(local, backends, local_biases)
    ] + [
        functional.FusedProblem(sp.local, be, bias, is_causal, ring=sp.keys, balance=sp.balance)
        if isinstance(sp.keys, _RingRows)
        else functional.FusedProblem(sp.local, be, bias, is_causal, remote=sp.keys, balance=sp.balance)
        for sp, be, bias in zip(spans, backends[len(local) :], span_biases)
    ]
    return functional.run_fused(query, key, value, fused, pattern.head_mode == "all", scale)


def _describe_call(
    query: Any,
    key: Any,
    value: Any,
    pattern: Any,
    is_causal: Any,
    key_padding_mask: Any,
    dropout_p: Any,
    softmax_scale: Any,
    method: Any,
    has_layout: bool,
    block_size: Any,
    exchange: Any,
) -> dict[str, Any]:
    """What every rank's call must agree on, as plain values (for :func:`check_call`)."""
    tensors = [x for x in (query, key, value) if isinstance(x, Tensor)]
    return {
        "pattern": repr(pattern),
        "dtype": str(query.dtype) if isinstance(query, Tensor) else None,
        "is_causal": is_causal,
        "key_padding_mask": key_padding_mask is not None,
        "dropout_p": dropout_p,
        "softmax_scale": softmax_scale,
        "method": method,
        "exchange": exchange,
        "block_layout": has_layout,
        "block_size": block_size if has_layout else None,
        "requires_grad": torch.is_grad_enabled() and any(x.requires_grad for x in tensors),
    }


def _gathered_key_bias(span: _Span, key_bias: Tensor) -> Tensor:
    """The padding bias ``(batch, total)`` of the span's gathered keys."""
    return span.keys.gather(key_bias[:, span.local.offset :: span.local.dilation])


def _gathered_keys(key: Tensor, value: Tensor, span: _Span) -> tuple[Tensor, Tensor]:
    """The span's keys and values from its members, ``(batch, heads, total, head_dim)``."""
    k, v = (_GatherRows.apply(functional._strided(x, span.local)[:, 0], span.keys) for x in (key, value))
    return k.transpose(1, 2), v.transpose(1, 2)


def _flex_span_problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    spans: list[_Span],
    layout: BlockLayout,
    is_causal: bool,
) -> Iterator[FlexProblem]:
    """This rank's queries of each spanning segment against the keys gathered for
    them, with a block mask over those keys (cached per layout and geometry
    unless a key padding mask, which changes with the inputs, is given)."""
    batch = query.shape[0]
    for sp in spans:
        q = flex_kernel.STRIDES.conform(functional._problem_view(query, sp.local))
        k, v = _gathered_keys(key, value, sp)
        keys_bias = None if key_bias is None else _gathered_key_bias(sp, key_bias)

        def build(sp: _Span = sp, keys_bias: Tensor | None = keys_bias) -> Any:
            return flex_kernel.gathered_block_mask(
                sp.local, sp.query_start, sp.keys.positions, layout.blocks, layout.block_size,
                is_causal, batch, keys_bias,
            )  # fmt: skip

        mask, score_mod = None, None
        if q.shape[2] and k.shape[2]:
            cache_key = ("span", sp.call, sp.local, sp.query_start, layout.block_size, is_causal, batch)
            mask, score_mod = (
                build()
                if keys_bias is not None
                else flex_kernel.CACHE.get(layout.cache_owner, cache_key, build)
            )
        yield FlexProblem(sp.local, q, k, v, mask, score_mod)
