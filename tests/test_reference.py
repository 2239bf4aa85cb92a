"""The reference against hand-computed cases and plain SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from .conftest import make_qkv


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw
    ).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w", [12, 40])
def test_one_dense_branch_is_sdpa(causal, w):
    q, k, v = make_qkv(2, 12, 3, 8, requires_grad=False)
    out = reference(q, k, v, [w], [1], is_causal=causal)
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=causal), rtol=1e-12, atol=1e-12)


def test_dilated_position_sees_exactly_the_named_keys():
    # one branch w=6, r=3, offset 0: segment 0 selects positions {0, 3}, segment 1 {6, 9}
    q, k, v = make_qkv(1, 12, 1, 4, requires_grad=False)
    out = reference(q, k, v, [6], [3])
    for p, keys in {0: [0, 3], 3: [0, 3], 6: [6, 9], 9: [6, 9]}.items():
        scores = (q[0, p, 0] @ k[0, keys, 0].T) / 2.0
        expected = torch.softmax(scores, -1) @ v[0, keys, 0]
        torch.testing.assert_close(out[0, p, 0], expected, rtol=1e-12, atol=1e-12)
    for p in (1, 2, 4, 5, 7, 8, 10, 11):  # not selected: no key, output 0
        assert torch.equal(out[0, p, 0], torch.zeros(4, dtype=q.dtype))


def test_all_mode_counts_a_key_once_per_branch():
    # branches (4, 1) and (8, 1), "all": a key in the query's 4-segment is selected
    # by both branches, so it has weight 2·exp(s); the rest of the 8-segment exp(s)
    q, k, v = make_qkv(1, 8, 1, 4, requires_grad=False)
    out, weights = reference(q, k, v, [4, 8], [1, 1], head_mode="all", return_weights=True)
    for p in range(8):
        scores = (q[0, p, 0] @ k[0, :, 0].T) / 2.0
        count = torch.ones(8, dtype=q.dtype)
        count[(p // 4) * 4 : (p // 4) * 4 + 4] = 2
        w = torch.softmax(scores + count.log(), -1)
        torch.testing.assert_close(weights[0, 0, p], w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[0, p, 0], w @ v[0, :, 0], rtol=1e-12, atol=1e-12)


def test_grouped_heads_use_their_own_branch_and_offset():
    # 2 heads, branches (4, 1) and (4, 2): head 0 dense within 4-segments, head 1
    # offset 1 % 2 = 1, so positions 1, 3 of each segment
    q, k, v = make_qkv(1, 8, 2, 4, requires_grad=False)
    out = reference(q, k, v, [4, 4], [1, 2])
    torch.testing.assert_close(
        out[:, :4, :1], _sdpa(q[:, :4, :1], k[:, :4, :1], v[:, :4, :1]), rtol=1e-12, atol=0
    )
    sel = [5, 7]
    torch.testing.assert_close(
        out[:, sel, 1:], _sdpa(q[:, sel, 1:], k[:, sel, 1:], v[:, sel, 1:]), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(out[:, [4, 6], 1], torch.zeros(1, 2, 4, dtype=q.dtype))


def test_weights_rows_sum_to_one_and_give_the_output():
    q, k, v = make_qkv(2, 13, 3, 4, requires_grad=False)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded -> rows of zeros
    out, weights = reference(
        q, k, v, [4, 8], [1, 2], head_mode="all", key_padding_mask=kpm, return_weights=True
    )
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]))
    assert torch.equal(sums[1], torch.zeros_like(sums[1]))
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", weights, v))


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = make_qkv(1, 8, 2, 4)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[3] = True  # query 3 may see nothing
    out = reference(q, k, v, [4, 8], [1, 2], head_mode="all", attn_mask=mask)
    assert torch.equal(out[0, 3], torch.zeros(2, 4, dtype=q.dtype))
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def test_float_mask_equals_bool_mask():
    q, k, v = make_qkv(1, 10, 2, 4, requires_grad=False)
    mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(1)) < 0.3
    additive = torch.zeros(10, 10, dtype=q.dtype).masked_fill(mask, -math.inf)
    a = reference(q, k, v, [5], [1], attn_mask=mask)
    b = reference(q, k, v, [5], [1], attn_mask=additive)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weights_stay_finite_when_every_score_is_very_negative():
    """exp(0 - lse) of an unselected key overflows float32 when lse < -88: the
    weights must still be finite (they were NaN) and the output equal the fused path's."""
    from dilated_attention_pytorch import ImprovedDilatedAttention

    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    q = (20 * u).expand(1, 16, 2, 8).clone()
    k = (-20 * u).expand(1, 16, 2, 8).clone() + 0.01 * torch.randn(1, 16, 2, 8)
    v = torch.randn(1, 16, 2, 8)
    attention = ImprovedDilatedAttention((4, 8), (1, 2), head_mode="all")
    out, weights = attention.dense_weights(q, k, v, is_causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 16))
    torch.testing.assert_close(out, attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-4)


def test_reference_refuses_what_would_not_fit_and_says_how_much():
    from dilated_attention_pytorch.reference import dense_bytes

    q = torch.zeros(1, 64, 2, 4)
    estimate = dense_bytes(1, 64, 2, torch.float32, 2)
    with pytest.raises(ValueError, match=r"would take about .* GiB, over max_bytes"):
        reference(q, q, q, (8, 16), (1, 2), max_bytes=estimate - 1)
    assert reference(q, q, q, (8, 16), (1, 2), max_bytes=estimate).shape == q.shape
    assert reference(q, q, q, (8, 16), (1, 2), max_bytes=None).shape == q.shape
