"""A value head_dim other than the query's: every path computes it exactly
(outputs ``(batch, seq, heads, head_dim_v)``, gradients), the fused path on the
backends that declare ``SUPPORTS_VALUE_HEAD_DIM``; the others say why they cannot."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dilated_attention_varlen, functional, kernels
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, PATTERNS, assert_close

IDS = [i.name for i in CPU_IMPLS]


def _qkv(seq: int, heads: int, kv_heads: int, head_dim: int = 6, value_dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, seq, kv_heads, value_dim, generator=g, dtype=torch.float64)
    return (x.requires_grad_() for x in (q, k, v))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("segment_lengths", "dilation_rates", "seq_len", "heads"), PATTERNS)
def test_value_head_dim_matches_reference(
    impl, head_mode, causal, segment_lengths, dilation_rates, seq_len, heads
):
    kv_heads = 1 if heads % 2 else heads // 2  # grouped-query heads too
    q, k, v = _qkv(seq_len, heads, kv_heads)
    if impl.backend is not None and not kernels.REGISTRY[impl.backend].SUPPORTS_VALUE_HEAD_DIM:
        with pytest.raises(ValueError, match="value head_dim must equal the query's"):
            impl(q, k, v, segment_lengths, dilation_rates, head_mode=head_mode, is_causal=causal)
        return
    out = impl(q, k, v, segment_lengths, dilation_rates, head_mode=head_mode, is_causal=causal)
    expected = reference(q, k, v, segment_lengths, dilation_rates, head_mode=head_mode, is_causal=causal)
    assert out.shape == (2, seq_len, heads, 3)
    assert_close(out, expected, torch.float64, impl.name)
    grad = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad),
                          torch.autograd.grad(expected, (q, k, v), grad)):  # fmt: skip
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


def test_value_head_dim_runs_the_fused_kernels_on_views(monkeypatch):
    """The fused path (not the gather path) takes a value head_dim, on the inputs
    users pass: transposed, sliced and expanded views."""
    from dilated_attention_pytorch.core import gather

    monkeypatch.setattr(gather, "run_gathered", lambda *a, **k: pytest.fail("ran the gather path"))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 24, 6, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 24, 1, 6, generator=g, dtype=torch.float64).expand(2, 24, 2, 6).requires_grad_()
    v = torch.randn(2, 24, 2, 7, generator=g, dtype=torch.float64)[..., 2:5].requires_grad_()
    kw = {"head_mode": "all", "is_causal": True}
    out = functional.dilated_attention(q, k, v, (4, 8, 16), (1, 2, 4), **kw)
    monkeypatch.undo()
    expected = reference(q, k, v, (4, 8, 16), (1, 2, 4), **kw)
    assert out.shape == (2, 24, 4, 3)
    assert_close(out, expected, torch.float64, "output")
    grad = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad),
                          torch.autograd.grad(expected, (q, k, v), grad)):  # fmt: skip
        assert_close(a, b, torch.float64, f"d{name}")


def test_value_head_dim_with_masks_queries_at_the_end_and_lse():
    q, k, v = _qkv(20, 4, 2)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, -3:] = True
    kw = {"head_mode": "all", "is_causal": True, "key_padding_mask": padding}
    out, lse = functional.dilated_attention(q, k, v, (4, 8), (1, 2), return_lse=True, **kw)
    expected = reference(q, k, v, (4, 8), (1, 2), **kw)
    assert_close(out, expected, torch.float64, "masked")
    assert lse.shape == (2, 20, 4)
    last = functional.dilated_attention(q[:, -5:], k, v, (4, 8), (1, 2), **kw)
    assert_close(last, expected[:, -5:], torch.float64, "queries at the end")


def test_value_head_dim_with_packed_documents():
    q, k, v = (x[0] for x in _qkv(23, 4, 4))
    cu = torch.tensor([0, 5, 17, 23], dtype=torch.int32)
    out = dilated_attention_varlen(q, k, v, cu, 12, (4, 8), (1, 2), head_mode="all", is_causal=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = reference(q[None, a:b], k[None, a:b], v[None, a:b], (4, 8), (1, 2), head_mode="all",
                             is_causal=True)[0]  # fmt: skip
        assert_close(out[a:b], expected, torch.float64, f"document {a}:{b}")


def test_every_backend_declares_why_it_cannot():
    spec = kernels.AttentionSpec("cuda", torch.bfloat16, 64, compute_capability=(9, 0), value_head_dim=32)
    for name, backend in kernels.REGISTRY.items():
        reasons = backend.not_supported_reasons(spec)
        assert backend.SUPPORTS_VALUE_HEAD_DIM or reasons, name
    assert not kernels.REGISTRY["math"].not_supported_reasons(
        kernels.AttentionSpec("cpu", torch.float32, 64, value_head_dim=64)
    )


def test_flex_refuses_other_value_head_dims_and_value_shape_is_checked():
    q, k, v = _qkv(16, 2, 2)
    with pytest.raises(ValueError, match="method='flex' needs the value's head_dim"):
        functional.dilated_attention(q, k, v, (8,), (1,), method="flex")
    with pytest.raises(ValueError, match=r"value \(batch, seqlen_k, kv_heads, head_dim_v\)"):
        functional.dilated_attention(q, k, v[:, :8], (8,), (1,))
