"""Grouped-query and multi-query attention: key/value with ``kv_heads`` heads,
query head j reading key/value head ``j // (heads // kv_heads)``. Every
implementation against multi-head attention on key/value repeated per query
head (an independent statement of the rule), outputs and gradients; the
gradient of a shared key/value head is the sum over the query heads reading it."""

import pytest
import torch

from dilated_attention_pytorch import functional
from dilated_attention_pytorch.kernels import REGISTRY
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, LAYOUTS, assert_close, make_strided

PATTERN = ((4, 8, 12), (1, 2, 4))
#: (heads, kv_heads): groups that split branches' head ranges, r | group, group | r, MQA
HEADS = [(6, 2), (6, 3), (8, 2), (12, 4), (4, 1), (5, 5)]


def _inputs(heads, kv_heads, seq=19, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, d, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(2, seq, kv_heads, d, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return q, k, v


def _expected(q, k, v, head_mode, causal, grad_out, **kw):
    """Multi-head attention on key/value repeated per query head."""
    group = q.shape[2] // k.shape[2]
    leaves = (k, v)
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    out = reference(q, k, v, *PATTERN, head_mode=head_mode, is_causal=causal, **kw)
    return out, torch.autograd.grad(out, (q, *leaves), grad_out)


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_implementation_matches_repeated_heads(impl, heads, kv_heads, head_mode, causal):
    q, k, v = _inputs(heads, kv_heads)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    expected, expected_grads = _expected(q, k, v, head_mode, causal, grad_out)
    out = impl(q, k, v, *PATTERN, head_mode=head_mode, is_causal=causal)
    assert_close(out, expected, torch.float64, f"{impl.name} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
def test_masks_with_shared_heads(impl):
    q, k, v = _inputs(8, 2)
    kpm = torch.rand(2, 19, generator=torch.Generator().manual_seed(1)) < 0.3
    attn = torch.rand(2, 8, 19, 19, generator=torch.Generator().manual_seed(2)) < 0.2
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    expected, expected_grads = _expected(q, k, v, "all", True, grad_out, key_padding_mask=kpm, attn_mask=attn)
    out = impl(q, k, v, *PATTERN, head_mode="all", is_causal=True, key_padding_mask=kpm, attn_mask=attn)
    assert_close(out, expected, torch.float64, f"{impl.name} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shared_heads_in_every_layout(layout):
    """Key/value views in every layout users pass, on the fused path ("auto")."""
    q, _, _ = _inputs(8, 2)
    (k_leaf, k), (v_leaf, v) = (make_strided(layout, (2, 19, 2, 4), seed=s) for s in (3, 4))
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    group = 4
    ref = reference(q, *(x.repeat_interleave(group, dim=2) for x in (k, v)), *PATTERN, head_mode="all")
    expected_grads = torch.autograd.grad(ref, (q, k_leaf, v_leaf), grad_out)
    out = functional.dilated_attention(q, k, v, *PATTERN, head_mode="all")
    assert_close(out, ref, torch.float64, f"{layout} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k_leaf, v_leaf), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{layout} d{name}")


@pytest.mark.parametrize(
    "backend",
    [name for name, b in REGISTRY.items() if b.SUPPORTS_GQA and "cpu" in (b.SUPPORTED_DEVICES or ["cpu"])],
)
def test_backends_without_native_sharing_take_repeated_heads(backend, monkeypatch):
    """The fused path's fallback for a kernel that does not share key/value heads
    (repeat per call, sum the gradients) gives the same function as the native one."""
    q, k, v = _inputs(12, 4)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    results = []
    for native in (True, False):
        monkeypatch.setattr(type(REGISTRY[backend]), "SUPPORTS_GQA", native)
        out = functional.dilated_attention(
            q, k, v, *PATTERN, head_mode="all", is_causal=True, backend=backend
        )
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert_close(a, b, torch.float64, f"{backend} {name}")


def test_key_value_gradients_have_key_value_shape():
    q, k, v = _inputs(8, 2)
    out = functional.dilated_attention(q, k, v, *PATTERN, head_mode="all")
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_flex_forward_with_shared_heads(head_mode):
    q, k, v = (x.detach().float() for x in _inputs(8, 2))
    with torch.no_grad():
        out = functional.dilated_attention(q, k, v, *PATTERN, head_mode=head_mode, method="flex")
    expected = reference(*(x.double() for x in (q, k, v)), *PATTERN, head_mode=head_mode)
    assert_close(out, expected, torch.float32, f"flex {head_mode}")


def test_reference_refuses_heads_that_do_not_divide():
    q, k, v = _inputs(6, 4)
    with pytest.raises(ValueError, match="heads % kv_heads == 0"):
        reference(q, k, v, *PATTERN)
