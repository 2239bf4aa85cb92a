"""The FlexAttention block masks: which tiles run, and which need no mask_mod,
checked against the position-level mask on CPU; the why-not reasons; the cache."""

import math

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.functional import _positions
from dilated_attention_pytorch.kernels import flex

T = flex.TILE


def _brute_force(call, layout4, block_size, causal):
    """Per (batch', segment, head', q tile, k tile): any / all allowed position pairs."""
    pos = _positions(call, torch.device("cpu"))  # (S, L)
    blocks = pos // block_size
    layout = flex._call_layout(layout4, call)
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
        need, full = flex.tile_masks(call, layout4, block_size, causal, masked=False)
        want_need, want_full = _brute_force(call, layout4, block_size, causal)
        assert torch.equal(need, want_need), f"tiles to run differ for {call}"
        # a tile may be treated as partial when it is full (safe), never the reverse
        assert not (full & ~want_full).any(), f"a tile marked full is not for {call}"
        if not causal:
            assert torch.equal(full, want_full & want_need), f"full tiles differ for {call}"
        masked_need, masked_full = flex.tile_masks(call, layout4, block_size, causal, masked=True)
        assert torch.equal(masked_need, need) and not masked_full.any()


def test_block_mask_indices_list_exactly_the_tiles():
    pattern = DilatedPattern((1024,), (2,))
    call = pattern.calls(2048, 2)[0]
    layout = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    mask, score_mod = flex.block_mask(call, layout, 128, False, batch=3)
    need, _ = flex.tile_masks(call, layout, 128, False, masked=False)
    dense = mask.to_dense().bool()  # (batch·segments, heads, tq, tk)
    assert dense.shape[0] == 3 * call.num_segments
    expected = flex._problem_batch(need, 3)
    assert torch.equal(dense, expected.expand_as(dense))
    assert score_mod is None


def test_finite_float_masks_get_a_score_mod():
    call = DilatedPattern((256,), (1,)).calls(256, 1)[0]
    layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    key_bias = torch.zeros(1, 256)
    assert flex.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is None
    key_bias[0, 3] = -math.inf
    assert flex.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is None
    key_bias[0, 4] = 0.5
    assert flex.block_mask(call, layout, 128, False, 1, key_bias=key_bias)[1] is not None


def test_not_supported_reasons():
    assert flex.not_supported_reasons("cpu", requires_grad=False) == []
    assert "forward-only" in flex.not_supported_reasons("cpu", requires_grad=True)[0]
    assert flex.not_supported_reasons("cuda", True, (9, 0), triton_available=True) == []
    assert "compute capability >= 8.0" in flex.not_supported_reasons("cuda", True, (7, 5), True)[0]
    assert "Triton" in flex.not_supported_reasons("cuda", True, (9, 0), triton_available=False)[0]
    assert "runs on cuda" in flex.not_supported_reasons("mps", False)[0]


def test_cache_hits_only_the_same_unmodified_layout():
    cache = flex.BlockMaskCache(size=2)
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
