"""The FlexAttention block masks: which tiles run, and which need no mask_mod,
checked against the position-level mask on CPU; the why-not reasons; the cache."""

import gc
import math

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.core.views import positions
from dilated_attention_pytorch.sparse import block_mask, flex

T = block_mask.TILE


def _brute_force(call, layout4, block_size, causal):
    """Per (batch', segment, head', q tile, k tile): any / all allowed position pairs."""
    pos = positions(call, torch.device("cpu"))  # (S, L)
    blocks = pos // block_size
    layout = block_mask.call_layout(layout4, call)
    allowed = layout[:, :, blocks[:, :, None], blocks[:, None, :]]  # (B', H', S, L, L)
    if causal:
        allowed = allowed & torch.ones(call.length, call.length, dtype=torch.bool).tril()
    tiles = math.ceil(call.length / T)
    pad = tiles * T - call.length
    padded = torch.nn.functional.pad(allowed.int(), (0, pad, 0, pad), value=-1)
    t = padded.unflatten(-2, (tiles, T)).unflatten(-1, (tiles, T)).transpose(-3, -2)  # (..., tq, tk, T, T)
    valid = t >= 0
    any_ = ((t == 1) & valid).flatten(-2).any(-1)
    all_ = ((t == 1) | ~valid).flatten(-2).all(-1)
    return any_.transpose(1, 2), all_.transpose(1, 2)


@pytest.mark.parametrize(
    "seg,dil,seq,heads,block_size",
    [
        ((512,), (1,), 1024, 2, 64),  # tiles == 2 blocks
        ((1024, 2048), (2, 4), 2048, 4, 48),  # dilated: a tile spans several blocks, unaligned
        ((900,), (3,), 1800, 3, 100),  # w % r != 0, segment not block aligned
        ((2048,), (16,), 2048, 1, 32),  # r > block_size / tile: sparse rows per block
        ((640, 1024), (1, 2), 1500, 2, 128),  # partial last segment
        ((512, 1024), (2, 4), 2048, 4, 512),  # tiles within blocks, several segments, offsets
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_tile_masks_match_the_position_mask(seg, dil, seq, heads, block_size, causal, per_head):
    pattern = DilatedPattern(seg, dil, "all")
    nb = math.ceil(seq / block_size)
    g = torch.Generator().manual_seed(0)
    layout = torch.rand(heads if per_head else 1, nb, nb, generator=g) < 0.3
    layout[:, : nb // 3, : nb // 3] = True  # some full tiles
    layout4 = layout[None]
    for call in pattern.calls(seq, heads):
        need, full = block_mask.tile_masks(call, layout4, block_size, causal, masked=False)
        want_need, want_full = _brute_force(call, layout4, block_size, causal)
        assert torch.equal(need, want_need), f"tiles to run differ for {call}"
        # a tile may be treated as partial when it is full (safe), never the reverse
        assert not (full & ~want_full).any(), f"a tile marked full is not for {call}"
        if not causal:
            assert torch.equal(full, want_full & want_need), f"full tiles differ for {call}"
        masked_need, masked_full = block_mask.tile_masks(call, layout4, block_size, causal, masked=True)
        assert torch.equal(masked_need, need) and not masked_full.any()


def test_tiles_within_blocks_are_recognised():
    """The aligned case above takes the one-gather path; unaligned ones do not."""
    calls = DilatedPattern((512, 1024), (2, 4), "all").calls(2048, 4)
    assert all(block_mask._tiles_within_blocks(c, 512, 0) for c in calls)
    assert not any(block_mask._tiles_within_blocks(c, 256, 0) for c in calls if c.dilation == 4)
    assert not block_mask._tiles_within_blocks(calls[0], 512, 128)  # a shard starting mid-block


def test_kernel_options_claim_divisibility_only_for_whole_tiles():
    assert flex._kernel_options(2 * T, 3 * T) == {"IS_DIVISIBLE": True}
    assert flex._kernel_options(2 * T, 3 * T + 1) == {"IS_DIVISIBLE": False}
    assert flex._kernel_options(T - 64, T) == {"IS_DIVISIBLE": False}


def test_stacked_and_one_by_one_block_lists_agree(monkeypatch):
    masks = [torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(i)) < 0.4 for i in range(4)]
    stacked = block_mask._to_kv_blocks(*masks)
    monkeypatch.setattr(block_mask, "_STACKED_SORT_LIMIT", 0)
    for (num, idx), (num1, idx1), mask in zip(stacked, block_mask._to_kv_blocks(*masks), masks):
        assert num.is_contiguous() and idx.is_contiguous() and num.dtype == idx.dtype == torch.int32
        assert torch.equal(num, num1) and torch.equal(idx, idx1)
        assert torch.equal(num, mask.sum(-1, dtype=torch.int32))
        listed = torch.gather(mask, -1, idx.long())
        in_list = torch.arange(9)[None, None, None] < num[..., None]
        assert torch.equal(listed, in_list)  # the first num indices are the allowed tiles


def test_block_mask_indices_list_exactly_the_tiles():
    pattern = DilatedPattern((1024,), (2,))
    call = pattern.calls(2048, 2)[0]
    layout = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    mask, score_mod = block_mask.block_mask(call, layout, 128, False, batch=3)
    need, _ = block_mask.tile_masks(call, layout, 128, False, masked=False)
    dense = mask.to_dense().bool()  # (batch·segments, heads, tq, tk)
    assert dense.shape[0] == 3 * call.num_segments
    expected = block_mask._problem_batch(need, 3)
    assert torch.equal(dense, expected.expand_as(dense))
    assert score_mod is None
    # the backward's per-column lists, built directly, are those FlexAttention derives
    derived = torch.nn.attention.flex_attention.BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=T
    )
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        counts = getattr(mask, num)
        assert torch.equal(counts, getattr(derived, num))
        listed = torch.arange(getattr(mask, idx).shape[-1]) < counts[..., None]
        assert torch.equal(getattr(mask, idx)[listed], getattr(derived, idx)[listed])


def test_finite_float_masks_get_a_score_mod():
    call = DilatedPattern((256,), (1,)).calls(256, 1)[0]
    layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    key_bias = torch.zeros(1, 256)
    assert block_mask.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is None
    key_bias[0, 3] = -math.inf
    assert block_mask.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is None
    key_bias[0, 4] = 0.5
    assert block_mask.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is not None


def test_not_supported_reasons():
    assert flex.not_supported_reasons("cpu", requires_grad=False) == []
    assert "forward-only" in flex.not_supported_reasons("cpu", requires_grad=True)[0]
    assert flex.not_supported_reasons("cuda", True, (9, 0), triton_available=True) == []
    assert "compute capability >= 8.0" in flex.not_supported_reasons("cuda", True, (7, 5), True)[0]
    assert "Triton" in flex.not_supported_reasons("cuda", True, (9, 0), triton_available=False)[0]
    assert "runs on cuda" in flex.not_supported_reasons("mps", False)[0]
    assert "attn_mask" in flex.not_supported_reasons("cuda", True, (9, 0), True, attn_masked=True)[0]
    assert flex.not_supported_reasons("cpu", False, attn_masked=True) == []


def test_cache_hits_only_the_same_unmodified_layout():
    cache = block_mask.BlockMaskCache(size=2)
    builds = []

    def build():
        builds.append(1)
        return len(builds)

    layout = torch.ones(2, 2, dtype=torch.bool)
    assert cache.get(layout, ("a",), build) == 1
    assert cache.get(layout, ("a",), build) == 1
    assert cache.get(layout.clone(), ("a",), build) == 2  # another tensor, equal contents: rebuilt
    layout[0, 1] = False  # in-place edit bumps the version
    assert cache.get(layout, ("a",), build) == 3
    assert cache.get(layout, ("b",), build) == 4
    assert cache.get(layout, ("c",), build) == 5
    assert cache.get(layout, ("a",), build) == 6  # evicted (size 2)


def test_cache_entries_go_with_their_layout():
    # layouts made per forward (BlockSparseAdaptive) must not pile up in the cache
    cache = block_mask.BlockMaskCache()
    call = DilatedPattern((256,), (1,)).calls(256, 1)[0]
    for _ in range(3):
        layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        cache.get(layout, ("mask",), lambda layout=layout: block_mask.block_mask(call, layout, 128, False, 1))
        assert len(cache) == 1  # the previous layout was freed, and its entry with it
    del layout
    gc.collect()
    assert len(cache) == 0


def test_block_mask_tensors_are_contiguous_for_per_head_layouts():
    # kernels address kv_num_blocks / kv_indices as (batch·heads, ...) with one stride:
    # non-mergeable strides (from the segment/head transpose) read out of bounds on GPUs
    call = DilatedPattern((512,), (2,), "all").calls(2048, 3)[0]  # heads 0 and 2 (offset 0)
    layout = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    mask, _ = block_mask.block_mask(call, layout, 128, False, batch=2)
    for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices):
        assert t.is_contiguous() and t.shape[:2] == (2 * call.num_segments, call.num_heads)


def _gathered_case(dilation: int, skip_member: bool):
    """300 queries of one rank (positions 1024 + r·i, 2 heads) and keys gathered from a
    2048-long segment: sorted, unevenly spaced (single rows skipped, and with
    ``skip_member`` the whole member 512..767)."""
    call = DilatedPattern((2048,), (dilation,), "all").calls(2048, 2)[0]
    call = type(call)(**{**call.__dict__, "length": 300})
    q_pos = 1024 + dilation * torch.arange(300)
    g = torch.Generator().manual_seed(dilation)
    candidates = torch.arange(0, 2048, dilation)
    kept = torch.rand(candidates.shape[0], generator=g) < 0.6
    if skip_member:
        kept &= candidates // 256 != 2
    return call, q_pos, candidates[kept], g


@pytest.mark.parametrize("dilation,block_size", [(1, 16), (3, 16), (2, 64)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gathered_tile_masks_match_the_position_mask(dilation, block_size, causal):
    # queries of one rank (positions 1024 + r·i) against keys gathered from a
    # segment: sorted, unevenly spaced (whole members and single rows skipped)
    call, q_pos, keys, g = _gathered_case(dilation, skip_member=True)
    heads, count, nb = call.num_heads, call.length, 2048 // block_size
    layout4 = (torch.rand(1, heads, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    layout4[..., : nb // 2, : nb // 2] = True  # some full tiles
    need, full = block_mask.gathered_tile_masks(call, 1024, keys, layout4, block_size, causal, masked=False)

    layout = block_mask.call_layout(layout4, call)
    allowed = layout[:, :, (q_pos // block_size)[:, None], (keys // block_size)[None, :]]
    if causal:
        allowed = allowed & (q_pos[:, None] >= keys[None, :])
    tq, tk = math.ceil(count / T), math.ceil(keys.shape[0] / T)
    pad = (0, tk * T - keys.shape[0], 0, tq * T - count)
    t = torch.nn.functional.pad(allowed.int(), pad, value=-1)
    t = t.unflatten(-2, (tq, T)).unflatten(-1, (tk, T)).transpose(-3, -2)
    want_need = ((t == 1) & (t >= 0)).flatten(-2).any(-1)
    want_full = ((t == 1) | (t < 0)).flatten(-2).all(-1)
    assert need.shape == want_need.shape == (1, call.num_heads, tq, tk)
    assert not (want_need & ~need).any(), "a tile with allowed pairs would be skipped"
    assert not (full & ~want_full).any(), "a tile marked full is not"
    if not causal and dilation <= block_size:  # block-exact, so exact here
        assert torch.equal(need, want_need)
        assert torch.equal(full, want_full & want_need)
    masked_need, masked_full = block_mask.gathered_tile_masks(
        call, 1024, keys, layout4, block_size, causal, True
    )
    assert torch.equal(masked_need, need) and not masked_full.any()


def _mod_on_needed_tiles(mask, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.mask_mod`` at every (problem row, head, query, key), and where the
    kernel evaluates it: inside the tiles the block mask runs (padded to whole
    tiles, as the kernel pads them)."""
    dense = mask.to_dense().bool()  # (B, H, tq, tk)
    batch, heads, tq, tk = dense.shape
    b = torch.arange(batch)[:, None, None, None]
    h = torch.arange(heads)[None, :, None, None]
    q = torch.arange(tq * T)[None, None, :, None]
    k = torch.arange(tk * T)[None, None, None, :]
    values = torch.broadcast_to(mask.mask_mod(b, h, q, k), (batch, heads, tq * T, tk * T))
    where = dense.repeat_interleave(T, -2).repeat_interleave(T, -1)
    return values[..., :rows, :cols], where[..., :rows, :cols]


@pytest.mark.parametrize(
    "seg,dil,seq,block_size,batch_layout",
    [
        ((512,), (1,), 1024, 128, False),  # tiles within blocks (on CUDA the mod drops the layout read)
        ((1024,), (2,), 2048, 256, True),  # the same with dilation, per-batch layout
        ((1024, 2048), (2, 4), 2048, 48, False),  # tiles spanning blocks: table reads
        ((900,), (3,), 1800, 100, True),  # unaligned segments
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_mod_matches_the_position_mask_on_the_tiles_it_runs(
    seg, dil, seq, block_size, batch_layout, causal
):
    heads, batch = 3, 2
    pattern = DilatedPattern(seg, dil, "all")
    nb = math.ceil(seq / block_size)
    g = torch.Generator().manual_seed(4)
    layout4 = torch.rand(batch if batch_layout else 1, heads, nb, nb, generator=g) < 0.4
    for call in pattern.calls(seq, heads):
        mask, _ = block_mask.block_mask(call, layout4, block_size, causal, batch)
        values, where = _mod_on_needed_tiles(mask, call.length, call.length)
        pos = positions(call, torch.device("cpu"))  # (S, L)
        blocks = pos // block_size
        layout = block_mask.call_layout(layout4, call).expand(batch, -1, -1, -1)
        want = layout[:, :, blocks[:, :, None], blocks[:, None, :]]  # (batch, H', S, L, L)
        want = want.transpose(1, 2).reshape(batch * call.num_segments, -1, call.length, call.length)
        if causal:
            want = want & torch.ones(call.length, call.length, dtype=torch.bool).tril()
        want = want.expand_as(values)
        assert torch.equal(values[where], want[where]), f"mask_mod differs for {call}"


@pytest.mark.parametrize("dilation,block_size", [(1, 16), (3, 16)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gathered_mask_mod_matches_the_position_mask(dilation, block_size, causal):
    call, q_pos, keys, g = _gathered_case(dilation, skip_member=False)
    heads, count, nb = call.num_heads, call.length, 2048 // block_size
    layout4 = torch.rand(1, heads, nb, nb, generator=g) < 0.3
    mask, _ = block_mask.gathered_block_mask(call, 1024, keys, layout4, block_size, causal, batch=2)
    values, where = _mod_on_needed_tiles(mask, count, keys.shape[0])
    layout = block_mask.call_layout(layout4, call)
    want = layout[:, :, (q_pos // block_size)[:, None], (keys // block_size)[None, :]]
    if causal:
        want = want & (q_pos[:, None] >= keys[None, :])
    assert torch.equal(values[where], want.expand_as(values)[where])
