"""Rotary and xPos: relative-position property, exact formula, errors, and
their use inside the multihead module against the reference."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import ImprovedMultiheadDilatedAttention, RotaryEmbedding, XPos
from dilated_attention_pytorch.positions import make_position_embedding
from dilated_attention_pytorch.reference import dilated_attention_reference

from .conftest import assert_close


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", [1, 7, 1000, 1_048_576])
def test_rotary_scores_depend_on_distance_only(shift: int, dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(8)
    q, k = torch.randn(2, 2, 10, 3, 8, dtype=dtype).unbind(0)
    near = _scores(*rope(q, k, offset=0))
    far = _scores(*rope(q, k, offset=shift))
    assert_close(far, near, dtype, "scores at shifted positions")
    # and it is not the identity: unrotated scores differ
    assert (near - _scores(q, k)).abs().max() > 1e-3


def test_rotary_keeps_norms_and_dtype() -> None:
    rope = RotaryEmbedding(16)
    q = torch.randn(1, 5, 2, 16, dtype=torch.bfloat16)
    rq, rk = rope(q, q, offset=3)
    assert rq.dtype == torch.bfloat16 and rk.dtype == torch.bfloat16
    torch.testing.assert_close(rq.float().norm(dim=-1), q.float().norm(dim=-1), atol=0.05, rtol=0.02)


def test_xpos_matches_its_formula() -> None:
    d, w, sb = 8, 16, 4.0
    xpos = XPos(d, segment_length=w, scale_base=sb)
    rope = RotaryEmbedding(d)
    q, k = torch.randn(2, 1, w, 1, d, dtype=torch.float64).unbind(0)
    xq, xk = xpos(q, k, offset=w)  # positions w .. 2w-1: one segment of the largest branch
    rq, rk = rope(q, k, offset=w)
    half = d // 2
    zeta = (torch.arange(half, dtype=torch.float64) / half + 0.4) / 1.4
    zeta = torch.cat((zeta, zeta))
    pos = torch.arange(w, dtype=torch.float64)
    decay = zeta ** ((pos[:, None, None] - pos[None, :, None]) / sb)  # (q, k, d)
    expected = torch.einsum("qd,kd,qkd->qk", rq[0, :, 0], rk[0, :, 0], decay)
    assert_close(_scores(xq, xk)[0, 0], expected, torch.float64, "xpos scores")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_xpos_centres_per_segment_so_long_offsets_stay_exact(dtype: torch.dtype) -> None:
    xpos = XPos(8, segment_length=16, scale_base=8.0)
    q, k = torch.randn(2, 1, 16, 1, 8, dtype=dtype).unbind(0)
    near = _scores(*xpos(q, k, offset=0))
    far = _scores(*xpos(q, k, offset=16 * 65_536))  # a segment a million positions later
    assert_close(far, near, dtype, "xpos scores one million positions later")


def test_xpos_needs_nested_segments_and_refuses_fp16_overflow() -> None:
    with pytest.raises(ValueError, match="divide the largest"):
        make_position_embedding("xpos", 8, (6, 16))
    xpos = make_position_embedding("xpos", 8, (2048, 32768))
    q = torch.randn(1, 4, 1, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"overflows torch\.float16"):
        xpos(q, q)
    xpos(q.bfloat16(), q.bfloat16())  # bf16 has the range
    # a dense segment of 256K positions overflows even float32 (factor ~e^320): refused, not inf
    long = make_position_embedding("xpos", 8, (262144,))
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        long(q.float(), q.float())
    long(q.double(), q.double())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 7}, "even"),
        ({"head_dim": 8, "base": 1.0}, "base"),
    ],
)
def test_rotary_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(**kwargs)


def test_unknown_position_kind() -> None:
    with pytest.raises(ValueError, match="position_embedding"):
        make_position_embedding("alibi", 8, (4,))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rotary", "xpos"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_multihead_applies_positions_before_dilated_attention(kind: str, head_mode: str) -> None:
    torch.manual_seed(0)
    e, h, n = 16, 4, 19
    seg, dil = (4, 8), (1, 2)
    mha = ImprovedMultiheadDilatedAttention(
        e,
        h,
        batch_first=True,
        segment_lengths=seg,
        dilation_rates=dil,
        head_mode=head_mode,
        position_embedding=kind,
        dtype=torch.float64,
    )
    x = torch.randn(2, n, e, dtype=torch.float64, requires_grad=True)
    out, _ = mha(x, x, x, is_causal=True)
    q, k, v = mha._project(x, x, x)
    q, k = mha.position_embedding(q, k)
    ref = dilated_attention_reference(q, k, v, seg, dil, head_mode=head_mode, is_causal=True)
    expected = mha.out_proj(ref.flatten(-2))
    assert_close(out, expected, torch.float64, f"{kind} output")
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(expected.square().sum(), x)
    assert_close(g, g_ref, torch.float64, f"{kind} input gradient")
