"""What each rank sends, and holds, for one sequence-parallel call of each
strategy, computed from the same geometry the exchanges use (no communication):
the planner ``exchange="auto"`` picks by, checked byte for byte against what the
code sends on gloo (tests/distributed/test_plan.py).

Counted per rank: bytes it sends to other ranks (an all-to-all's chunk for
itself and an all-gather's own part are not sent), in the forward and in the
backward, on the fused path (no dropout, no block layout), including the one
small all-gather that checks every rank makes the same call. "Held": bytes of
other ranks' data a rank keeps at once for the attention (the gathered keys
of its spanning segments; the ring's two blocks; Ulysses' whole sequence of its
heads, less its own shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .._checks import accumulation_dtype
from ..pattern import DilatedPattern, kv_call, split_for_kv
from .balance import plan_balance
from .checks import check_geometry, collective_device
from .geometry import segment_members, selection
from .ulysses import head_parallel_reasons

#: the strategies :func:`plan_communication` plans ("hybrid": Ulysses over the
#: process group, ``ring_exchange`` over the ring group)
STRATEGIES = ("all_gather", "ring", "ulysses", "hybrid")
#: int64 elements of the all-gathered row of ``checks.check_call``
_CHECK_ROW = 7


@dataclasses.dataclass(frozen=True)
class CommunicationPlan:
    """Bytes per rank, in sequence-shard order."""

    strategy: str
    world: int
    forward: tuple[int, ...]
    backward: tuple[int, ...]
    held: tuple[int, ...]

    @property
    def per_rank(self) -> tuple[int, ...]:
        return tuple(f + b for f, b in zip(self.forward, self.backward))

    @property
    def max_bytes(self) -> int:
        """The busiest rank's bytes (forward and backward): what bounds the step."""
        return max(self.per_rank)

    def describe(self) -> str:
        return (
            f"{self.strategy}: at most {_mib(self.max_bytes)} sent per rank "
            f"(forward {_mib(max(self.forward))}, backward {_mib(max(self.backward))}), "
            f"at most {_mib(max(self.held))} of other ranks' data held"
        )


def _mib(x: int) -> str:
    return f"{x / 2**20:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class _Sizes:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    elem: int  # bytes of the inputs' dtype
    acc: int  # bytes of the accumulation dtype (float32, float64 for float64)


def plan_communication(
    pattern: DilatedPattern,
    seq_len: int,
    world: int,
    strategy: str,
    *,
    heads: int,
    head_dim: int,
    kv_heads: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    is_causal: bool = False,
    key_padding: bool = False,
    backward: bool = True,
    ring_world: int | None = None,
    ring_exchange: str = "all_gather",
) -> CommunicationPlan:
    """Bytes each rank sends for one call of :func:`ring_dilated_attention`.

    Args:
        pattern: the layer's pattern.
        seq_len: the whole sequence's length (every rank holds ``seq_len / P``).
        world: ranks of the process group (with ``"hybrid"``: of the head-parallel group).
        strategy: one of :data:`STRATEGIES`.
        heads: query heads of the layer.
        head_dim: per head (queries, keys and values).
        kv_heads: key/value heads (default ``heads``).
        batch: batch size.
        dtype: the inputs' dtype.
        is_causal: causal calls also move the rows that balance causal work.
        key_padding: a ``key_padding_mask`` is passed.
        backward: also count the backward (else zeros).
        ring_world: with ``"hybrid"``, ranks of the ring group (the sequence
            is over ``world · ring_world`` ranks).
        ring_exchange: with ``"hybrid"``, ``"all_gather"`` or ``"ring"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kv = heads if kv_heads is None else kv_heads
    sizes = _Sizes(batch, heads, kv, head_dim, dtype.itemsize, accumulation_dtype(dtype).itemsize)
    if strategy in ("ulysses", "hybrid"):
        reasons = head_parallel_reasons(heads, kv, world)
        if reasons:
            raise ValueError(f"{strategy} splits heads over {world} ranks: {'; '.join(reasons)}")
    if strategy == "hybrid":
        if ring_world is None or ring_exchange not in ("all_gather", "ring"):
            raise ValueError("hybrid needs ring_world and ring_exchange 'all_gather' or 'ring'")
        return _hybrid(
            pattern, seq_len, world, ring_world, ring_exchange, sizes, is_causal, key_padding, backward
        )
    if seq_len % world:
        raise ValueError(f"seq_len ({seq_len}) must divide by world ({world})")
    if strategy != "ulysses":
        check_geometry(pattern, seq_len, seq_len // world)
    rows = []
    for rank in range(world):
        if strategy == "ulysses":
            rows.append(_ulysses(seq_len // world, world, sizes, key_padding, backward))
        else:
            rows.append(
                _sequence(pattern, seq_len, world, rank, strategy, sizes, is_causal, key_padding, backward)
            )
    return _plan(strategy, rows)


def _plan(strategy: str, rows: list[tuple[int, int, int]]) -> CommunicationPlan:
    forward, back, held = (tuple(r[i] for r in rows) for i in range(3))
    return CommunicationPlan(strategy, len(rows), forward, back, held)


def _check(world: int) -> int:
    return _CHECK_ROW * 8 * (world - 1)


def _ulysses(shard: int, world: int, s: _Sizes, key_padding: bool, backward: bool) -> tuple[int, int, int]:
    """q, k, v to heads and the output back; the backward moves their gradients."""
    # q, k, v and the output: all but the chunk for itself
    moved = s.batch * shard * (2 * s.heads + 2 * s.kv_heads) * s.head_dim * s.elem * (world - 1) // world
    forward = moved + _check(world) + (s.batch * shard * s.acc * (world - 1) if key_padding else 0)
    # the whole sequence of its heads' q, k, v, less its own shard
    held = s.batch * shard * (s.heads + 2 * s.kv_heads) * s.head_dim * s.elem * (world - 1) // world
    return forward, moved if backward else 0, held


def _sequence(
    pattern: DilatedPattern,
    seq: int,
    world: int,
    rank: int,
    strategy: str,
    s: _Sizes,
    is_causal: bool,
    key_padding: bool,
    backward: bool,
) -> tuple[int, int, int]:
    """The segments spanning shards: their selected rows' keys and values (the
    key/value heads each problem reads: one per part of split_for_kv), the
    padding rows, the causal balance."""
    shard = seq // world
    forward, back, held = _check(world), 0, 0
    for call in split_for_kv(pattern.calls(seq, s.heads), s.heads, s.kv_heads):
        found = segment_members(call, rank, shard) if call.segment_length > shard else None
        if found is None:
            continue
        segment, members = found
        counts = [selection(call, segment, j, shard)[1] for j in members]
        me = members.index(rank)
        # one row of keys (or values)
        row = s.batch * kv_call(call, s.heads, s.kv_heads)[0].num_heads * s.head_dim * s.elem
        m = len(counts)
        if strategy == "all_gather":
            forward += (m - 1) * counts[me] * 2 * row
            back += sum(c for j, c in enumerate(counts) if j != me) * 2 * row
            held += (sum(counts) - counts[me]) * 2 * row
        else:  # the ring: m - 1 hops forward; the backward rotates them again, and the gradients m hops
            hops = [counts[(me - t) % m] for t in range(m)]
            forward += sum(hops[:-1]) * 2 * row
            back += (sum(hops[:-1]) + sum(hops)) * 2 * row
            held = max(held, 2 * max(counts) * 2 * row)
        if key_padding and counts[me]:
            forward += (m - 1) * counts[me] * s.batch * s.acc
        if is_causal:
            balance = plan_balance(counts, me, list(range(m)), None, 0)
            if balance is not None:
                rows = s.batch * call.num_heads * balance.rows
                if balance.lender:  # its last query rows go, their results come back
                    forward += rows * s.head_dim * s.elem
                    back += rows * (2 * s.head_dim * s.elem + s.acc)  # grad_out, out, lse
                else:  # the borrowed rows' results go back
                    forward += rows * (s.head_dim + 1) * s.acc
                    back += rows * s.head_dim * s.acc  # their dq
    return forward, back if backward else 0, held


def _hybrid(
    pattern: DilatedPattern,
    seq: int,
    heads_world: int,
    ring_world: int,
    ring_exchange: str,
    s: _Sizes,
    is_causal: bool,
    key_padding: bool,
    backward: bool,
) -> CommunicationPlan:
    """Ulysses over the head group, then each head slice's call over the ring
    group on the ring-major sequence blocks."""
    world = heads_world * ring_world
    if seq % world:
        raise ValueError(f"seq_len ({seq}) must divide by world · ring_world ({world})")
    shard = seq // world
    check_geometry(pattern, seq, seq // ring_world)
    outer = _ulysses(shard, heads_world, s, key_padding, backward)
    local = dataclasses.replace(s, heads=s.heads // heads_world, kv_heads=s.kv_heads // heads_world)
    rows = []
    for i in range(ring_world):  # ring-major: rank (i, j) holds shard i · heads_world + j
        for j in range(heads_world):
            heads = pattern.head_slice(j * local.heads, s.heads)
            inner = _sequence(
                heads, seq, ring_world, i, ring_exchange, local, is_causal, key_padding, backward
            )
            rows.append(tuple(a + b for a, b in zip(outer, inner)))
    return _plan("hybrid", rows)  # type: ignore[arg-type]


def choose_exchange(plans: list[CommunicationPlan], max_held_bytes: int | None = None) -> CommunicationPlan:
    """The plan whose busiest rank sends the fewest bytes, among those whose held
    bytes fit ``max_held_bytes`` (None: no limit); ties keep the earlier plan."""
    fitting = [p for p in plans if max_held_bytes is None or max(p.held) <= max_held_bytes]
    if not fitting:
        raise ValueError(
            f"no sequence-parallel strategy fits {_mib(max_held_bytes or 0)} of exchanged data per rank: "
            + "; ".join(p.describe() for p in plans)
        )
    return min(fitting, key=lambda p: p.max_bytes)


def candidate_plans(
    pattern: DilatedPattern, seq_len: int, world: int, *, ring: bool = True, **call: Any
) -> list[CommunicationPlan]:
    """The plans of every strategy this call can run, in the order ties are
    broken; ``call``: :func:`plan_communication`'s keywords (``heads``,
    ``head_dim``, ...); ``ring``: the fused path, where the ring differs from
    the all-gather."""
    plans = []
    for strategy in ("ulysses", "all_gather", "ring") if ring else ("ulysses", "all_gather"):
        try:
            plans.append(plan_communication(pattern, seq_len, world, strategy, **call))
        except ValueError:  # heads or segments that do not fit this world
            continue
    return plans


def explain_exchange(
    pattern: DilatedPattern, seq_len: int, world: int, max_held_bytes: int | None = None, **call: Any
) -> str:
    """What ``exchange="auto"`` picks for these arguments (those of
    :func:`candidate_plans`) and every candidate's bytes."""
    plans = candidate_plans(pattern, seq_len, world, **call)
    if not plans:
        return "no strategy can run: heads and segment lengths fit no exchange on this world"
    best = choose_exchange(plans, max_held_bytes)
    lines = [f"auto picks {best.strategy!r} (fewest bytes sent by the busiest rank)"]
    lines += [f"  {p.describe()}" for p in plans]
    return "\n".join(lines)


def auto_exchange(
    pattern: DilatedPattern,
    seq_len: int,
    world: int,
    shape: tuple[int, int, int, int],
    kv_heads: int,
    dtype: torch.dtype,
    is_causal: bool,
    key_padding: bool,
    ring: bool,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> CommunicationPlan:
    """``exchange="auto"`` of a checked call; on CUDA the budget is half the
    smallest free memory over the group (one all-reduce), so every rank picks
    the same."""
    b, _, h, d = shape
    plans = candidate_plans(
        pattern, seq_len, world, heads=h, head_dim=d, kv_heads=kv_heads, batch=b, dtype=dtype,
        is_causal=is_causal, key_padding=key_padding, ring=ring,
    )  # fmt: skip
    if not plans:
        raise ValueError(
            f"exchange='auto': no strategy can run {h} heads ({kv_heads} key/value heads) and "
            f"segment_lengths {pattern.segment_lengths} on {world} ranks of {seq_len // world} positions"
        )
    budget = None
    if device.type == "cuda":
        free = torch.tensor([torch.cuda.mem_get_info(device)[0]], device=collective_device(group))
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
        budget = int(free.item()) // 2
    return choose_exchange(plans, budget)


__all__ = [
    "STRATEGIES",
    "CommunicationPlan",
    "auto_exchange",
    "candidate_plans",
    "choose_exchange",
    "explain_exchange",
    "plan_communication",
]
