"""The core modules are thin wrappers over the functional core."""

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, ImprovedDilatedAttention, functional
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from .conftest import assert_close, make_qkv

MODULES = [DilatedAttention, ImprovedDilatedAttention]
IDS = ["standard", "improved"]


@pytest.mark.parametrize("cls", MODULES, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_module_matches_reference(cls, head_mode):
    m = cls([4, 8], [1, 3], head_mode=head_mode, softmax_scale=0.4)
    q, k, v = make_qkv(2, 18, 3)
    kpm = torch.zeros(2, 18, dtype=torch.bool)
    kpm[0, 2] = True
    out = m(q, k, v, is_causal=True, key_padding_mask=kpm)
    exp = reference(
        q, k, v, [4, 8], [1, 3], head_mode=head_mode, is_causal=True, key_padding_mask=kpm, softmax_scale=0.4
    )
    assert_close(out, exp, torch.float64, "output")


def test_module_attributes_and_repr():
    m = ImprovedDilatedAttention([4, 8], [1, 2], head_mode="all", attention_dropout=0.1)
    assert m.segment_lengths == (4, 8) and m.dilation_rates == (1, 2) and m.head_mode == "all"
    assert "segment_lengths=[4, 8]" in repr(m)
    assert m.method == "fused" and DilatedAttention.method == "gather"


@pytest.mark.parametrize("cls", MODULES, ids=IDS)
def test_dropout_only_in_training(cls):
    m = cls([4], [1], attention_dropout=0.5)
    q, k, v = make_qkv(1, 8, 2, requires_grad=False)
    m.eval()
    assert_close(m(q, k, v), reference(q, k, v, [4], [1]), torch.float64, "eval")
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(q, k, v), reference(q, k, v, [4], [1]))


def test_improved_backend_is_passed_through():
    m = ImprovedDilatedAttention([4], [1], backend="math")
    q, k, v = make_qkv(1, 8, 2, requires_grad=False)
    expected = functional.dilated_attention(q, k, v, [4], [1], backend="math")
    assert torch.equal(m(q, k, v), expected)
    with pytest.raises(ValueError, match="backend 'sdpa_cudnn' cannot run"):
        ImprovedDilatedAttention([4], [1], backend="sdpa_cudnn")(q, k, v)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"softmax_scale": 0.0}, "softmax_scale must be a positive finite"),
        ({"attention_dropout": -0.1}, r"attention_dropout must be a float in \[0, 1\)"),
        ({"head_mode": "grouped2"}, "head_mode must be one of"),
    ],
)
@pytest.mark.parametrize("cls", MODULES, ids=IDS)
def test_constructor_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([4], [1], **kwargs)


def test_core_modules_take_packed_documents_and_the_others_say_why_not():
    from dilated_attention_pytorch import (
        BlockSparseRingDilatedAttention,
        DilatedAttention,
        ImprovedDilatedAttention,
        RingDilatedAttention,
        dilated_attention_varlen,
    )

    g = torch.Generator().manual_seed(0)
    q = torch.randn(30, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(30, 2, 8, generator=g, dtype=torch.float64) for _ in "kv")
    cu = torch.tensor([0, 7, 30], dtype=torch.int32)
    expected = dilated_attention_varlen(q, k, v, cu, 23, (4, 8), (1, 2), is_causal=True)
    for cls in (DilatedAttention, ImprovedDilatedAttention):
        out = cls((4, 8), (1, 2))(q, k, v, is_causal=True, cu_seqlens=cu, max_seqlen=23)
        torch.testing.assert_close(out, expected)
    for module in (RingDilatedAttention((4, 8), (1, 2)), BlockSparseRingDilatedAttention((4, 8), (1, 2))):
        with pytest.raises(NotImplementedError, match="packed documents"):
            module(q, k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="not taken with cu_seqlens"):
        DilatedAttention((4,), (1,))(
            q, k, v, cu_seqlens=cu, key_padding_mask=torch.zeros(1, 30, dtype=torch.bool)
        )
