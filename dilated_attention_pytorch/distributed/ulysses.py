"""Head-parallel sequence parallelism (DeepSpeed-Ulysses) for dilated attention.

One all-to-all turns this rank's sequence shard of every head into the whole
sequence of ``heads / P`` heads (key/value: ``kv_heads / P``); the rank computes
those heads on one device with no further communication, evaluating the
pattern on them as heads of the whole layer (:meth:`DilatedPattern.head_slice`),
and one all-to-all turns the output back. Causal work is balanced by
construction: every rank holds every position. What travels: q, k, v and the
output once each way, ``(2·heads + 2·kv_heads)·n/P·head_dim`` elements per rank
and direction (forward; the backward moves their gradients the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..pattern import DilatedPattern


def _exchange(x: Tensor, group: dist.ProcessGroup | None, to_heads: bool) -> Tensor:
    """``(b, n/P, H, d)`` -> ``(b, n, H/P, d)`` (``to_heads``) or back. Chunk ``i``
    of the sent tensor goes to rank ``i``; what comes from rank ``i`` is its
    sequence shard (``to_heads``) or its heads."""
    world = dist.get_world_size(group)
    if to_heads:
        b, s, h, d = x.shape
        send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    else:
        b, n, hp, d = x.shape
        send = x.reshape(b, world, n // world, hp, d).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    if to_heads:  # (P, b, s, H/P, d): shard i of the sequence from rank i
        return received.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)
    # (P, b, n/P, H/P, d): heads block i from rank i
    return received.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * hp, d)


class _AllToAll(torch.autograd.Function):
    """:func:`_exchange`, whose backward is the inverse exchange of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None, to_heads: bool) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.to_heads = group, to_heads
        return _exchange(x, group, to_heads)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _exchange(grad.contiguous(), ctx.group, not ctx.to_heads), None, None


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's sequence shard ``(batch, seq / P, heads, d)`` of every head as the
    whole sequence of its heads ``(batch, seq, heads / P, d)``, differentiable."""
    return _AllToAll.apply(x, group, True)  # type: ignore[no-any-return]


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The inverse of :func:`sequence_to_heads`, differentiable."""
    return _AllToAll.apply(x, group, False)  # type: ignore[no-any-return]


def head_parallel_reasons(num_heads: int, kv_heads: int, world: int) -> list[str]:
    """Why ``exchange="ulysses"`` cannot split these heads over ``world`` ranks (empty: it can)."""
    reasons = []
    if num_heads % world:
        reasons.append(f"heads ({num_heads}) must divide by the process group's size ({world})")
    if kv_heads % world:
        reasons.append(f"kv_heads ({kv_heads}) must divide by the process group's size ({world})")
    return reasons


def _gather_sequence(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``(batch, seq / P)`` shards as ``(batch, seq)`` on every rank (masks: no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 1)


def local_attention(
    pattern: DilatedPattern,
    *,
    layout: str = "sbhd",
    process_group: dist.ProcessGroup | None = None,
    **kwargs: Any,
) -> Callable[..., Tensor]:
    """The one-device dilated function as the ``local_attention`` of an external
    Ulysses wrapper (DeepSpeed's ``DistributedAttention(local_attention,
    sequence_process_group)``): it gets the whole sequence of this rank's
    ``heads / P`` heads and evaluates the pattern on them as heads
    ``rank·heads/P ..`` of the layer (``process_group``: the wrapper's sequence
    group). ``layout``: the wrapper's tensor layout, ``"sbhd"`` (DeepSpeed's
    default, ``scatter_idx=2, gather_idx=0``) or ``"bshd"``; ``kwargs`` go to
    :func:`~dilated_attention_pytorch.dilated_attention` (``is_causal``,
    ``softmax_scale``, ``method``, ...). Extra positional arguments the wrapper
    passes are refused, not ignored."""
    from ..functional import dilated_attention

    if layout not in ("sbhd", "bshd"):
        raise ValueError(f"layout must be 'sbhd' or 'bshd', got {layout!r}")

    def attention(query: Tensor, key: Tensor, value: Tensor, *args: Any) -> Tensor:
        if args:
            raise TypeError(f"dilated local_attention takes query, key, value only, got {len(args)} more")
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        q, k, v = (x.transpose(0, 1) if layout == "sbhd" else x for x in (query, key, value))
        heads = q.shape[2]
        out = dilated_attention(q, k, v, pattern.head_slice(rank * heads, heads * world), **kwargs)
        return out.transpose(0, 1) if layout == "sbhd" else out

    return attention


def ulysses_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pattern: DilatedPattern,
    attention: Any,
    key_bias: Tensor | None,
    block_layout: Tensor | None,
    process_group: dist.ProcessGroup | None,
) -> Tensor:
    """This rank's output shard ``(batch, seq / P, heads, head_dim)``.

    ``attention(q, k, v, pattern, key_padding_mask, block_layout)``: the one-device
    function on the rank's heads (the caller binds the remaining arguments);
    ``key_bias``: this rank's ``(batch, seq / P)`` shard of the padding bias.
    The caller has checked the heads (:func:`head_parallel_reasons`) and that
    every rank's call matches."""
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    h = query.shape[2]
    q, k, v = (sequence_to_heads(x, process_group) for x in (query, key, value))
    heads = pattern.head_slice(rank * (h // world), h)
    padding = None if key_bias is None else _gather_sequence(key_bias, process_group)
    if block_layout is not None and block_layout.dim() >= 3 and block_layout.shape[-3] == h > 1:
        per_rank = h // world
        block_layout = block_layout.narrow(-3, rank * per_rank, per_rank)
    out = attention(q, k, v, heads, padding, block_layout)
    return heads_to_sequence(out, process_group)


__all__ = [
    "head_parallel_reasons",
    "heads_to_sequence",
    "local_attention",
    "sequence_to_heads",
    "ulysses_attention",
]
