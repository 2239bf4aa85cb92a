"""``ring_dilated_attention``: dilated attention of a sequence sharded over a
process group, on the fused, gather or FlexAttention path."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from ..core import fused, gather, views
from ..core.bias import call_bias
from ..core.exchange import KeyExchange
from ..core.fused import FusedProblem
from ..core.gather import GatheredProblem
from ..functional import _dilated_attention
from ..pattern import DilatedPattern, split_for_kv
from ..sparse import flex
from ..sparse.block_layout import BlockLayout, layout_bias, one_block, prepare_layout
from ..sparse.block_mask import CACHE, gathered_block_mask
from .all_gather import GatherRowsFunction
from .checks import Exchange, check_call, check_exchange, check_geometry, describe_call, group_of
from .geometry import Span, local_calls, spans
from .plan import auto_exchange
from .ulysses import head_parallel_reasons, ulysses_attention


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
    device_mesh: Any = None,
    mesh_dim: int | str | None = None,
    method: _checks.Method = "fused",
    backend: str | None = None,
    block_layout: Tensor | None = None,
    block_size: int = 128,
    exchange: Exchange = "all_gather",
    ring_group: dist.ProcessGroup | None = None,
    ring_exchange: Exchange = "all_gather",
) -> Tensor:
    """Dilated attention of a sequence sharded over ``process_group``.

    ``query``, ``key``, ``value``: this rank's shard ``(batch, seq / P, heads, head_dim)``;
    ``key_padding_mask``: its shard ``(batch, seq / P)``. Returns this rank's shard
    of the output of the function (docs/semantics.md) on the whole sequence. ``method``/``backend``
    as in :func:`~dilated_attention_pytorch.dilated_attention` (dropout takes the gather path).
    ``block_layout`` (the same on every rank) is over blocks of the *whole*
    sequence, ``n_blocks = ceil(seq / block_size)``, and runs with ``method="flex"``
    or ``"gather"``; ``method="flex"`` without one uses a single block.

    ``process_group``, or ``device_mesh`` and its sequence-parallel ``mesh_dim``
    (``init_device_mesh``; a 1-D mesh needs no ``mesh_dim``): the ranks that
    share the sequence (default: the world).

    ``exchange``: how a segment spanning shards brings its keys together on the
    fused path. ``"all_gather"`` gathers the segment's selected rows on each of
    its ranks (one collective, hidden behind the local branches); ``"ring"``
    rotates them among those ranks with ``batch_isend_irecv``, each hop under
    the previous block's kernel, and the backward rotates them again, so a rank
    holds two blocks of rows instead of the segment's. The gather and flex paths
    (dropout, ``block_layout``) always gather. ``"ulysses"`` is head parallelism
    (:mod:`.ulysses`): one all-to-all gives each rank the whole sequence of
    ``heads / P`` heads (``heads`` and ``kv_heads`` must divide by ``P``), it runs
    them on one device with any method, and one all-to-all brings the output
    back; key/value heads travel unrepeated.

    ``ring_group`` (with ``exchange="ulysses"``): the hybrid of both (USP's
    design): heads split over ``process_group`` (within a node, say), the
    sequence over ``ring_group`` too with ``ring_exchange`` (``"all_gather"``
    or ``"ring"``, across nodes), so the head count does not cap the ranks.
    The rank with index ``i`` in ``ring_group`` and ``j`` in ``process_group``
    holds sequence shard ``i · |process_group| + j``.

    ``"auto"``: the strategy whose busiest rank sends the fewest bytes
    (:func:`~.plan.plan_communication`) among those this call can run, whose
    exchanged data fits half the free memory of the fullest GPU (on CUDA);
    :func:`~.plan.explain_exchange` says why.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "RingDilatedAttention needs torch.distributed initialized (torchrun, then "
            "torch.distributed.init_process_group)"
        )
    process_group = group_of(process_group, device_mesh, mesh_dim)
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
        shape, key_bias, _, scale = _checks.validate_call(
            query, key, value, is_causal, key_padding_mask, None, dropout_p, softmax_scale, method
        )
        if ring_group is not None and exchange != "ulysses":
            raise ValueError(f"ring_group needs exchange='ulysses' (the hybrid), got exchange={exchange!r}")
        if ring_group is not None and check_exchange(ring_exchange) in ("ulysses", "auto"):
            raise ValueError(f"ring_exchange must be 'all_gather' or 'ring', got {ring_exchange!r}")
        if exchange == "ulysses":
            reasons = head_parallel_reasons(shape[2], key.shape[2], world)
            if reasons:
                raise ValueError(f"exchange='ulysses' splits heads over ranks: {'; '.join(reasons)}")
        if value.shape[3] != shape[3]:
            raise ValueError(
                "sequence-parallel dilated attention needs the value's head_dim to equal the query's, got "
                f"{value.shape[3]} and {shape[3]}: its exchanges move keys and values in one layout"
            )
        if key.shape[1] != shape[1]:
            raise ValueError(
                "sequence-parallel dilated attention needs seqlen_q == seqlen_k (each rank holds the same "
                f"positions of queries and keys), got query.shape[1] = {shape[1]} and key.shape[1] = "
                f"{key.shape[1]}"
            )
        if fused.functorch_active(query, key, value):
            raise RuntimeError(
                "torch.func transforms (vmap, grad, jacrev) are not supported by sequence-parallel dilated "
                "attention: its keys come from other ranks through communication"
            )
        if method == "flex" and block_layout is None:
            block_layout, block_size = one_block(query.device), shape[1] * world
        if block_layout is not None:
            if method == "fused":
                raise ValueError(
                    "block_layout runs with method='flex' (FlexAttention) or method='gather', not 'fused'"
                )
            layout = prepare_layout(
                block_layout, block_size, shape, query.dtype, query.device, shape[1] * world
            )
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    description = describe_call(
        query, key, value, pattern, is_causal, key_padding_mask, dropout_p, softmax_scale, method,
        block_layout is not None, block_size, exchange,
    )  # fmt: skip
    check_call(query, process_group, description, error, None if layout is None else layout.blocks)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    b, shard, h, _ = shape
    if exchange == "auto":  # the same choice on every rank: it depends on the checked call only
        exchange = auto_exchange(
            pattern,
            shard * world,
            world,
            shape,
            key.shape[2],
            query.dtype,
            is_causal,
            key_bias is not None,
            method == "fused" and dropout_p == 0.0 and layout is None,
            process_group,
            query.device,
        ).strategy  # type: ignore[assignment]
    seq = shard * world
    if exchange == "ulysses":

        def attention(
            q: Tensor, k: Tensor, v: Tensor, heads: DilatedPattern, padding: Tensor | None,
            layout: Tensor | None,
        ) -> Tensor:  # fmt: skip
            if ring_group is not None:  # the hybrid: this block of the sequence, over the ring group
                return ring_dilated_attention(
                    q, k, v, heads, is_causal=is_causal, key_padding_mask=padding, dropout_p=dropout_p,
                    softmax_scale=softmax_scale, process_group=ring_group, method=method, backend=backend,
                    block_layout=layout, block_size=block_size, exchange=ring_exchange,
                )  # fmt: skip
            return _dilated_attention(
                q, k, v, heads, is_causal, padding, None, dropout_p, softmax_scale, method, backend,
                layout, block_size, warn_layout=False,
            )  # fmt: skip

        return ulysses_attention(query, key, value, pattern, attention, key_bias, block_layout, process_group)
    fused_path = method == "fused" and dropout_p == 0.0
    calls = pattern.calls(seq, h)
    if fused_path:  # key/value heads travel unrepeated: each problem reads its heads regularly
        calls = split_for_kv(calls, h, key.shape[2])
    elif key.shape[2] != h:  # the gather and flex paths take one key/value row per query head
        key, value = (x.repeat_interleave(h // key.shape[2], dim=2) for x in (key, value))
    check_geometry(pattern, seq, shard)
    if layout is not None:
        layout = dataclasses.replace(layout, offset=rank * shard)
    local = local_calls([c for c in calls if c.segment_length <= shard], rank, shard)
    spanning = [c for c in calls if c.segment_length > shard]
    rotate = exchange == "ring" and fused_path
    found = spans(spanning, rank, process_group, shard, query.device, layout, is_causal, rotate)

    if method == "flex":
        assert layout is not None
        flex.check_flex(query, key, value)
        local_problems = flex.flex_problems(query, key, value, key_bias, None, local, layout, is_causal)
        return flex.run_flex(
            query,
            itertools.chain(
                local_problems, _flex_span_problems(query, key, value, key_bias, found, layout, is_causal)
            ),
            pattern,
            scale,
        )

    if method == "gather" or dropout_p > 0.0:
        span_biases = [_span_bias(sp, key_bias, is_causal, query, layout) for sp in found]

        def problems() -> Iterator[GatheredProblem]:
            yield from gather.local_problems(query, key, value, key_bias, None, local, is_causal, layout)
            for sp, bias in zip(found, span_biases):
                q = views.problem_view(query, sp.local)
                k, v = _gathered_keys(key, value, sp)
                positions = views.positions(sp.local, query.device).reshape(-1)
                yield GatheredProblem(sp.local, positions, q, k, v, bias, False)

        sdpa = method == "fused" and layout is None
        return gather.run_gathered(query, problems(), pattern, scale, dropout_p, sdpa=sdpa)

    # block by block, one block per member: causality is the kernels' (see FusedProblem)
    span_biases = [_span_bias(sp, key_bias, False, query, None) for sp in found]
    local_biases = [call_bias(c, key_bias, None, b) for c in local]
    problem_calls = local + [sp.local for sp in found]
    biases = local_biases + span_biases
    backends = fused.select_backends(query, value, problem_calls, [x is not None for x in biases], backend)
    problems_fused = [
        FusedProblem(c, be, bias, is_causal) for c, be, bias in zip(local, backends, local_biases)
    ] + [
        # no block layout here, so the keys travel as a KeyExchange (never SparseRows)
        FusedProblem(sp.local, be, bias, is_causal, exchange=cast(KeyExchange, sp.keys))
        for sp, be, bias in zip(found, backends[len(local) :], span_biases)
    ]
    return fused.run_fused(query, key, value, problems_fused, pattern, scale)


def _span_bias(
    span: Span, key_bias: Tensor | None, is_causal: bool, query: Tensor, layout: BlockLayout | None
) -> Tensor | None:
    """Padding of the gathered keys, causality and the block layout between this
    rank's queries and them: ``(batch | 1, heads | 1, count, total)``, or None."""
    keys, local = span.keys, span.local
    parts = []
    if key_bias is not None:
        parts.append(_gathered_key_bias(span, key_bias)[:, None, None, :])
    q_pos = span.query_start + local.dilation * torch.arange(local.length, device=query.device)
    bias_dtype = _checks.accumulation_dtype(query.dtype)
    if is_causal:
        parts.append(_checks.mask_to_bias(q_pos[:, None] < keys.positions[None, :], bias_dtype)[None, None])
    if layout is not None:
        heads = span.call.heads()
        parts.append(layout_bias(layout.blocks, layout.block_size, q_pos, keys.positions, bias_dtype, heads))
    bias = None
    for part in parts:
        bias = part if bias is None else bias + part
    return bias


def _gathered_key_bias(span: Span, key_bias: Tensor) -> Tensor:
    """The padding bias ``(batch, total)`` of the span's gathered keys."""
    return span.keys.gather(key_bias[:, span.local.offset :: span.local.dilation])


def _gathered_keys(key: Tensor, value: Tensor, span: Span) -> tuple[Tensor, Tensor]:
    """The span's keys and values from its members, ``(batch, heads, total, head_dim)``."""
    k, v = (GatherRowsFunction.apply(views.strided(x, span.local)[:, 0], span.keys) for x in (key, value))
    return k.transpose(1, 2), v.transpose(1, 2)


def _flex_span_problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    spans: list[Span],
    layout: BlockLayout,
    is_causal: bool,
) -> Iterator[flex.FlexProblem]:
    """This rank's queries of each spanning segment against the keys gathered for
    them, with a block mask over those keys (cached per layout and geometry
    unless a key padding mask, which changes with the inputs, is given)."""
    batch = query.shape[0]
    for sp in spans:
        q = flex.STRIDES.conform(views.problem_view(query, sp.local))
        k, v = _gathered_keys(key, value, sp)
        keys_bias = None if key_bias is None else _gathered_key_bias(sp, key_bias)

        def build(sp: Span = sp, keys_bias: Tensor | None = keys_bias) -> Any:
            return gathered_block_mask(
                sp.local, sp.query_start, sp.keys.positions, layout.blocks, layout.block_size,
                is_causal, batch, keys_bias,
            )  # fmt: skip

        mask, score_mod = None, None
        if q.shape[2] and k.shape[2]:
            cache_key = ("span", sp.call, sp.local, sp.query_start, layout.block_size, is_causal, batch)
            mask, score_mod = (
                build() if keys_bias is not None else CACHE.get(layout.cache_owner, cache_key, build)
            )
        yield flex.FlexProblem(sp.local, q, k, v, mask, score_mod)
