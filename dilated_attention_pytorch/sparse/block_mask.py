"""FlexAttention block masks built analytically from a block layout.

Each branch problem runs in its compact layout (the dilated positions next to
each other), so a tile of the kernel is 128 dilated queries × 128 dilated keys,
never a mostly masked tile of the natural layout (docs/benchmarks.md,
"Block-sparse dilated attention", has the rates). A tile is skipped when no block pair it covers is allowed,
run without a mask when all are (and no mask or causal diagonal cuts it), and
masked exactly by ``mask_mod`` otherwise. Built masks are cached per layout
(:class:`BlockMaskCache`)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._cache import BoundedCache
from ..pattern import BranchCall

try:  # FlexAttention appeared in torch 2.5
    from torch.nn.attention import flex_attention as flex_module
except ImportError:  # pragma: no cover - torch < 2.5
    flex_module = None  # type: ignore[assignment]

#: FlexAttention's tile (rows and columns of the compact layout)
TILE = 128


def _tile_starts(call: BranchCall, device: torch.device, layout_offset: int = 0) -> Tensor:
    """Natural position of each compact tile's first row: ``(segments | 1, tiles)``."""
    base = layout_offset + call.start + call.offset
    step = call.dilation * TILE
    starts = torch.arange(base, base + call.dilation * call.length, step, device=device)[None]
    if call.num_segments > 1:
        starts = starts + torch.arange(call.num_segments, device=device)[:, None] * call.segment_length
    return starts


def _tile_blocks(
    call: BranchCall, block_size: int, device: torch.device, layout_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """First and last natural block of each compact tile: two ``(segments, tiles)``."""
    starts = _tile_starts(call, device, layout_offset).expand(call.num_segments, -1)
    # rows after a tile's first: TILE - 1, fewer in a short last tile
    rest = torch.clamp(call.length - 1 - torch.arange(0, call.length, TILE, device=device), max=TILE - 1)
    return starts // block_size, (starts + call.dilation * rest) // block_size


def call_layout(layout4: Tensor, call: BranchCall) -> Tensor:
    """The layout's heads of ``call``: ``(batch | 1, heads_of_call | 1, nb, nb)``."""
    if layout4.shape[1] == 1:
        return layout4
    return layout4[:, call.head_start :: call.head_step][:, : call.num_heads]


def _tile_masks_within_blocks(
    call: BranchCall, layout4: Tensor, block_size: int, causal: bool, masked: bool, layout_offset: int
) -> tuple[Tensor, Tensor]:
    """:func:`tile_masks` where every tile lies in one natural block (see
    :func:`_tiles_within_blocks`): one gather of the layout at the tiles' blocks,
    a handful of ops instead of prefix sums (the build is host-bound at 64K)."""
    blocks = _tile_starts(call, layout4.device, layout_offset) // block_size  # (segments | 1, tiles)
    need = call_layout(layout4, call)[:, :, blocks[:, :, None], blocks[:, None, :]]  # (B', H', S, t, t)
    if causal:
        need = need.tril()  # a diagonal tile runs if its block allows itself
    if masked:
        full = torch.zeros_like(need)
    else:
        full = need.tril(-1) if causal else need
    return need.transpose(1, 2), full.transpose(1, 2)


def tile_masks(
    call: BranchCall, layout4: Tensor, block_size: int, causal: bool, masked: bool, layout_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Which compact tiles to run, and which of them need no ``mask_mod``:
    two bool ``(batch | 1, segments, heads | 1, tiles, tiles)``.

    A tile covers the natural blocks ``lo..hi`` of its rows and columns; counting
    the allowed block pairs of that rectangle (2-D prefix sums of each
    segment's part of the layout) tells empty, full and partial tiles apart.
    ``layout_offset``: the layout's position of the call's position 0 (a shard's start).
    """
    if _tiles_within_blocks(call, block_size, layout_offset):
        return _tile_masks_within_blocks(call, layout4, block_size, causal, masked, layout_offset)
    device = layout4.device
    lo, hi = _tile_blocks(call, block_size, device, layout_offset)
    seg_lo = lo[:, :1]
    nb = layout4.shape[-1]
    # blocks a segment's selected positions can touch, bounded on the host (no sync)
    span = min(nb, (call.dilation * (call.length - 1) + block_size - 1) // block_size + 2)
    idx = torch.clamp(seg_lo + torch.arange(span, device=device), max=nb - 1)  # (S, span)
    sub = call_layout(layout4, call)[:, :, idx[:, :, None], idx[:, None, :]]  # (B', H', S, span, span)
    a, b = lo - seg_lo, hi - seg_lo + 1  # half-open block ranges of each tile, per segment
    s = torch.arange(call.num_segments, device=device)[:, None, None]
    aq, bq, ak, bk = a[:, :, None], b[:, :, None], a[:, None, :], b[:, None, :]

    def rectangle_counts(x: Tensor) -> Tensor:
        counts = x.to(torch.int32).cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32)
        prefix = torch.nn.functional.pad(counts, (1, 0, 1, 0))
        return (
            prefix[..., s, bq, bk] - prefix[..., s, aq, bk] - prefix[..., s, bq, ak] + prefix[..., s, aq, ak]
        )

    count = rectangle_counts(sub)
    area = (bq - aq) * (bk - ak)
    need, full = count > 0, (count == area) & (not masked)
    if causal:
        tiles = lo.shape[1]
        tq, tk = torch.arange(tiles, device=device)[:, None], torch.arange(tiles, device=device)[None, :]
        # a diagonal tile runs only if a block pair on or below the diagonal is allowed
        diagonal_need = (
            rectangle_counts(sub & torch.ones(span, span, dtype=torch.bool, device=device).tril()) > 0
        )
        need = torch.where(tq == tk, diagonal_need, need & (tq > tk))
        full = full & (tq > tk)
    return need.transpose(1, 2), full.transpose(1, 2)


_STACKED_SORT_LIMIT = 2**22  # tiles of one mask


def _to_kv_blocks(*masks: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Bool ``(B, H, row tiles, column tiles)`` of one shape -> (kv_num_blocks, kv_indices) of
    each, int32 and contiguous: FlexAttention's kernels address them as
    ``(B·H, ...)`` with one stride, so a batch-head layout left over from a
    transpose (per-head layouts) made them read out of bounds (the illegal
    memory access). Small masks are stacked to share one count and one sort
    (the build is a few dozen small ops, host-bound at 64K); large ones go one
    at a time, as the sort's int64 indices of four 1M-token masks take 2 GiB."""
    if masks[0].numel() > _STACKED_SORT_LIMIT and len(masks) > 1:
        return [pair for mask in masks for pair in _to_kv_blocks(mask)]
    stacked = torch.stack(masks)  # a contiguous copy; its slices are contiguous
    num = stacked.sum(-1, dtype=torch.int32)
    order = torch.argsort(stacked.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return list(zip(num.unbind(0), order.unbind(0)))


def _from_tiles(
    need: Tensor, full: Tensor, mask_mod: Callable[..., Tensor], seq_lengths: tuple[int, int]
) -> Any:
    """The BlockMask running ``need`` tiles, those in ``full`` without ``mask_mod``;
    both bool ``(batch, heads | 1, q tiles, k tiles)``. The backward's per-column
    lists are the same sort of the transposed tiles: ``BlockMask.from_kv_blocks``
    would rebuild the dense tiles from the row lists first (most of a build's
    host time; docs/benchmarks.md)."""
    partial = need & ~full
    rows, cols = (partial, full), (partial.transpose(-2, -1), full.transpose(-2, -1))
    if need.shape[-1] == need.shape[-2]:
        lists = _to_kv_blocks(*rows, *cols)
    else:
        lists = _to_kv_blocks(*rows) + _to_kv_blocks(*cols)
    (kv_num, kv_idx), (full_num, full_idx), (q_num, q_idx), (full_q_num, full_q_idx) = lists
    return flex_module.BlockMask(
        seq_lengths=seq_lengths,
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(TILE, TILE),
        mask_mod=mask_mod,
    )


def _problem_batch(x: Tensor, batch: int) -> Tensor:
    """``(batch | 1, segments, ...)`` -> ``(batch·segments | segments, ...)``: the
    problem's batch is batch-major over segments. A one-batch layout broadcasts,
    but the block mask's batch must then equal the problem's."""
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    return x.flatten(0, 1)


def _flat(x: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """A tensor as 1-D storage plus its dims, for clamped linear indexing in mods."""
    if x is None:
        return None
    # detached: a view would keep the layout's Python object alive (see BlockMaskCache)
    return x.contiguous().reshape(-1).detach(), torch.tensor(x.shape, device=x.device)


def _tiles_within_blocks(call: BranchCall, block_size: int, layout_offset: int) -> bool:
    """Whether every compact tile of ``call`` lies within one natural block (then the
    layout is constant on each tile, so a partial tile is cut only by causality or
    masks): a tile spans ``dilation · TILE`` positions, so blocks must be a multiple
    of that and every segment must start on a block boundary."""
    return (
        block_size % (call.dilation * TILE) == 0
        and (layout_offset + call.start) % block_size == 0
        and (call.segment_length % block_size == 0 or call.num_segments == 1)
    )


def _padded_index(length: int, device: torch.device) -> Tensor:
    """``0 … length - 1`` padded to whole tiles by repeating the last index: tables
    indexed with it answer mods evaluated on padded rows and columns in range."""
    padded = -(-length // TILE) * TILE
    return torch.clamp(torch.arange(padded, device=device), max=length - 1)


def _compact_blocks(
    first: int, segment_length: int, segments: int, dilation: int, length: int, block_size: int, device
) -> Tensor:
    """Layout block of each compact position ``first + s · segment_length + dilation · i``,
    int32 ``(segments · padded,)`` with ``padded`` = length rounded up to whole tiles;
    padded positions repeat the last block, so mods evaluated there stay in range."""
    i = _padded_index(length, device)
    starts = first + segment_length * torch.arange(segments, device=device)[:, None]
    return ((starts + dilation * i) // block_size).to(torch.int32).reshape(-1)


def _layout_lookup(
    layout4: Tensor, call: BranchCall, row_blocks: Tensor, col_blocks: Tensor, segments: int
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """``allowed(b, h, q_idx, kv_idx)`` from the call's layout, via per-position block
    tables (``(segments · padded_q,)`` and ``(segments · padded_k,)`` int32, problem
    row ``b`` in segment ``b % segments``): two table reads per row and column and
    one layout read per pair, in int32 and without division: recomputing blocks
    from positions in the mod made partial tiles several times slower
    (docs/benchmarks.md, "Block-sparse dilated attention")."""
    layout = call_layout(layout4, call)
    planes_batch, planes_head, nb = layout.shape[0], layout.shape[1], layout.shape[-1]
    index = torch.int32 if layout.numel() < 2**31 else torch.int64
    flat = layout.contiguous().reshape(-1).detach()
    same = col_blocks is row_blocks
    # one table when rows and columns share it: dynamo guards on captured tensors
    # aliasing, and a failing aliasing guard crashes its recompile-reason code
    tables = [row_blocks.to(index)] if same else [row_blocks.to(index), col_blocks.to(index)]
    geom = torch.tensor(
        [segments, tables[0].numel() // segments, tables[-1].numel() // segments, planes_head, nb],
        dtype=index,
        device=layout.device,
    )

    def allowed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        segment = b % geom[0]
        plane = (b // geom[0]) * geom[3] if planes_batch > 1 else 0
        if planes_head > 1:
            plane = plane + h
        row = (plane * geom[4] + tables[0][segment * geom[1] + q_idx]) * geom[4]
        return flat[row + tables[-1][segment * geom[2] + kv_idx]]

    return allowed


def _at_most(x: Tensor, limit: Tensor) -> Tensor:
    """``min(x, limit)`` in mods, written with ``where``: torch 2.11's CuTe lowering
    of mods (FlexAttention's ``BACKEND="FLASH"``) rejects ``minimum``. (That
    backend still fails on these mods for other reasons; see docs/benchmarks.md.)"""
    return torch.where(x > limit, limit, x)


def _at(
    storage: tuple[Tensor, Tensor], bo: Tensor, head: Tensor, i: Tensor, j: Tensor | None = None
) -> Tensor:
    """``x[bo, head, i, j]`` (``x[bo, i]`` for 2-D ``x``) with size-1 dims broadcast
    and every index clamped into range: the kernel evaluates mods on padded rows
    and tiles too (it drops those results), which must not read out of bounds."""
    data, dims = storage
    if j is None:  # (batch, seq)
        return data[_at_most(bo, dims[0] - 1) * dims[1] + _at_most(i, dims[1] - 1)]
    bi = _at_most(bo, dims[0] - 1)
    hi = _at_most(head, dims[1] - 1)
    ii, jj = _at_most(i, dims[2] - 1), _at_most(j, dims[3] - 1)
    return data[((bi * dims[1] + hi) * dims[2] + ii) * dims[3] + jj]


def _key_score_mod(
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    place: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, ...]],
) -> Callable[..., Tensor] | None:
    """The score_mod adding finite float masks (None when they only remove keys).
    ``place(b, h, q_idx, kv_idx)`` -> (batch, head, query index, key index) into them."""
    key_add = _flat(key_bias) if _has_finite_bias(key_bias) else None
    attn_add = _flat(attn_bias) if _has_finite_bias(attn_bias) else None
    if key_add is None and attn_add is None:
        return None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bo, head, pq, pk = place(b, h, q_idx, kv_idx)
        if key_add is not None:
            score = score + _at(key_add, bo, head, pk).to(score.dtype)
        if attn_add is not None:
            score = score + _at(attn_add, bo, head, pq, pk).to(score.dtype)
        return score

    return score_mod


def block_mask(
    call: BranchCall,
    layout4: Tensor,
    block_size: int,
    causal: bool,
    batch: int,
    key_bias: Tensor | None = None,
    attn_bias: Tensor | None = None,
    layout_offset: int = 0,
) -> tuple[Any, Callable[..., Tensor] | None]:
    """The BlockMask (and score_mod, for finite float masks) of one branch problem.

    ``layout4``: bool ``(batch | 1, heads | 1, nb, nb)`` over natural blocks, whose
    position ``layout_offset`` is the call's position 0; ``key_bias`` ``(batch, seq)``
    and ``attn_bias`` ``(batch | 1, heads | 1, seq, seq)`` additive (``-inf``
    removes a key). Positions are recomputed from the compact indices inside
    ``mask_mod``, so nothing ``(length, length)`` is materialised.
    """
    masked = key_bias is not None or attn_bias is not None
    need, full = tile_masks(call, layout4, block_size, causal, masked, layout_offset)
    need, full = _problem_batch(need, batch), _problem_batch(full, batch)

    # geometry of the masks' positions as a tensor, so compiled kernels do not
    # specialise on each branch's numbers (only with masks: it costs a copy to the GPU)
    geom = None
    if masked:
        geom = torch.tensor(
            [
                call.num_segments,
                call.segment_length,
                call.start + call.offset,
                call.dilation,
                call.head_start,
                call.head_step,
                call.length - 1,
            ],
            device=layout4.device,
        )
    key_flat, attn_flat = _flat(key_bias), _flat(attn_bias)
    if layout4.device.type == "cuda" and _tiles_within_blocks(call, block_size, layout_offset):
        # every tile lies in one block pair, so need and full say it all; only the
        # compiled kernel follows them (eager FlexAttention, on CPU, applies mask_mod
        # to every pair)
        allowed = None
    else:
        rows = _compact_blocks(
            layout_offset + call.start + call.offset,
            call.segment_length,
            call.num_segments,
            call.dilation,
            call.length,
            block_size,
            layout4.device,
        )
        allowed = _layout_lookup(layout4, call, rows, rows, call.num_segments)

    def place(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, ...]:
        """Batch, head, query and key positions of problem row ``b``, head ``h``."""
        assert geom is not None  # only masked calls place positions
        row = geom[2] + (b % geom[0]) * geom[1]
        pq = row + geom[3] * _at_most(q_idx, geom[6])
        pk = row + geom[3] * _at_most(kv_idx, geom[6])
        return b // geom[0], geom[4] + geom[5] * h, pq, pk

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = allowed(b, h, q_idx, kv_idx) if allowed is not None else q_idx >= 0
        if causal:
            ok = ok & (q_idx >= kv_idx)
        if key_flat is not None or attn_flat is not None:
            bo, head, pq, pk = place(b, h, q_idx, kv_idx)
            if key_flat is not None:
                ok = ok & (_at(key_flat, bo, head, pk) > -math.inf)
            if attn_flat is not None:
                ok = ok & (_at(attn_flat, bo, head, pq, pk) > -math.inf)
        return ok

    if allowed is None and not causal and not masked:
        mask_mod = flex_module.noop_mask  # type: ignore[assignment]  # no partial tile: a kernel without mask code
    mask = _from_tiles(need, full, mask_mod, (call.length, call.length))
    return mask, _key_score_mod(key_bias, attn_bias, place)


def gathered_tile_masks(
    call: BranchCall,
    query_start: int,
    key_positions: Tensor,
    layout4: Tensor,
    block_size: int,
    causal: bool,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`tile_masks` of queries ``query_start + dilation · i`` (``i < call.length``)
    against keys at the sorted positions ``key_positions`` (gathered from other
    ranks, not evenly spaced): two bool ``(batch | 1, heads | 1, q tiles, k tiles)``.

    Exact at block level: per query tile, how many of its blocks allow each key
    block (prefix sums over query blocks), then per key tile a product with the
    tile's block incidence (its keys' blocks) tells whether any pair is allowed
    and whether all are.
    """
    device = layout4.device
    first = torch.arange(0, call.length, TILE, device=device)
    q_lo = query_start + call.dilation * first
    q_hi = query_start + call.dilation * (torch.clamp(first + TILE, max=call.length) - 1)
    blocks_lo, blocks_hi = q_lo // block_size, q_hi // block_size
    layout = call_layout(layout4, call).to(torch.int32)
    prefix = torch.nn.functional.pad(layout.cumsum(-2, dtype=torch.int32), (0, 0, 1, 0))
    allowed_rows = prefix[..., blocks_hi + 1, :] - prefix[..., blocks_lo, :]  # (B', H', tq, nb)
    area = (blocks_hi - blocks_lo + 1)[:, None]

    total = key_positions.shape[0]
    k_tiles = -(-total // TILE)
    # 0/1 products only tested for > 0, which rounding cannot change: bf16 on GPUs
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    incidence = torch.zeros(k_tiles, layout.shape[-1], device=device, dtype=dtype)
    tile_of_key = torch.arange(total, device=device) // TILE
    incidence[tile_of_key, key_positions // block_size] = 1.0
    need = ((allowed_rows > 0).to(dtype) @ incidence.T) > 0
    full = ~(((allowed_rows < area).to(dtype) @ incidence.T) > 0) & (not masked)
    if causal:
        starts = torch.arange(0, total, TILE, device=device)
        k_first = key_positions[starts]
        k_last = key_positions[torch.clamp(starts + TILE, max=total) - 1]
        need = need & (q_hi[:, None] >= k_first[None, :])
        full = full & (q_lo[:, None] >= k_last[None, :])
    return need, full


def gathered_block_mask(
    call: BranchCall,
    query_start: int,
    key_positions: Tensor,
    layout4: Tensor,
    block_size: int,
    causal: bool,
    batch: int,
    key_bias: Tensor | None = None,
) -> tuple[Any, Callable[..., Tensor] | None]:
    """The BlockMask (and score_mod) of one rank's queries of a segment spanning
    ranks, ``query_start + call.dilation · i`` in the layout's positions, against
    the keys gathered for them at the sorted ``key_positions`` ``(total,)``;
    ``key_bias``: ``(batch, total)`` additive, of the gathered keys."""
    masked = key_bias is not None
    need, full = gathered_tile_masks(call, query_start, key_positions, layout4, block_size, causal, masked)
    need, full = (x.expand(batch, *x.shape[1:]) for x in (need, full))
    total = key_positions.shape[0]
    geom = torch.tensor(
        [query_start, call.dilation, call.length - 1, block_size, call.head_start, call.head_step, total - 1],
        device=layout4.device,
    )
    key_flat = _flat(key_bias)
    positions = key_positions.contiguous()
    rows = _compact_blocks(query_start, 0, 1, call.dilation, call.length, block_size, layout4.device)
    cols = positions[_padded_index(total, positions.device)] // block_size
    allowed = _layout_lookup(layout4, call, rows, cols, 1)

    def place(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, ...]:
        """Batch, head, query position and gathered key index."""
        return b, geom[4] + geom[5] * h, geom[0] + geom[1] * _at_most(q_idx, geom[2]), kv_idx

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = allowed(b, h, q_idx, kv_idx)
        if causal or key_flat is not None:
            bo, head, pq, k_index = place(b, h, q_idx, kv_idx)
            if causal:
                ok = ok & (pq >= positions[_at_most(k_index, geom[6])])
            if key_flat is not None:
                ok = ok & (_at(key_flat, bo, head, k_index) > -math.inf)
        return ok

    mask = _from_tiles(need, full, mask_mod, (call.length, total))
    return mask, _key_score_mod(key_bias, None, place)


def _has_finite_bias(bias: Tensor | None) -> bool:
    """Whether an additive mask adds anything besides removing keys (-inf)."""
    return bias is not None and bool((torch.isfinite(bias) & (bias != 0)).any())


class BlockMaskCache:
    """A small LRU of values built from a layout (block masks, exchange plans),
    keyed by the layout tensor and the geometry.

    Holds only a weak reference to each layout: its entries go when it is freed,
    so layouts made per forward (``BlockSparseAdaptive``) do not pile up, and
    before a new tensor could take its id; the version counter catches in-place
    edits. Cached values must not keep the layout alive (``_flat`` detaches).
    """

    def __init__(self, size: int = 64) -> None:
        self._entries: BoundedCache[tuple[weakref.ref, int, Any]] = BoundedCache(size)

    @property
    def size(self) -> int:
        return self._entries.size

    def get(self, layout: Tensor, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        full_key = (id(layout), *key)
        hit = self._entries.lookup(full_key)
        if hit is not None and hit[0]() is layout and hit[1] == layout._version:
            return hit[2]
        value = build()
        self._entries.put(full_key, (weakref.ref(layout, self._forget(id(layout))), layout._version, value))
        return value

    def _forget(self, layout_id: int) -> Callable[[weakref.ref], None]:
        entries = self._entries

        def drop(_: weakref.ref) -> None:
            for key in entries.keys():
                if key[0] == layout_id:  # type: ignore[index]
                    entries.pop(key)

        return drop

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


CACHE = BlockMaskCache()
