"""The ``flash_attn_4`` backend's calls on the CPU, through a stand-in for
``flash_attn.cute.interface`` with FlashAttention-4's conventions
(``(batch, seq, heads, head_dim)`` views, optional destinations): the
transposes and into-place writes of the backend, through the fused path,
against the reference. The GPU tests run the real kernels where installed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern, dilated_attention
from dilated_attention_pytorch.kernels import flash4
from dilated_attention_pytorch.kernels.math import MathBackend
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import assert_close, grads, make_strided, strided_view


def _flash_attn_fwd(q, k, v, softmax_scale, causal, return_lse, out=None):
    assert return_lse
    result, lse, _ = MathBackend().forward(
        *(x.transpose(1, 2) for x in (q, k, v)), None, causal, softmax_scale
    )
    result = result.transpose(1, 2)
    if out is not None:
        out.copy_(result)
        result = out
    return result, lse


def _flash_attn_bwd(q, k, v, out, dout, lse, scale, causal, dq=None, dk=None, dv=None):
    q, k, v, out, dout = (x.transpose(1, 2) for x in (q, k, v, out, dout))
    parts = MathBackend().backward(dout, q, k, v, out, lse, None, causal, scale, None)
    results = []
    for dest, part in zip((dq, dk, dv), parts):
        part = part.transpose(1, 2)
        if dest is not None:
            dest.copy_(part)
            part = dest
        results.append(part)
    return tuple(results)


@pytest.fixture
def stand_in(monkeypatch):
    interface = SimpleNamespace(_flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)
    monkeypatch.setattr(flash4, "_interface", lambda: interface)
    monkeypatch.setattr(flash4, "installed_version", lambda: flash4.TESTED_VERSIONS[0])
    for name, value in (("SUPPORTED_DEVICES", None), ("SUPPORTED_DTYPES", None)):
        monkeypatch.setattr(flash4.Flash4Backend, name, value)


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "seq_major", "packed_qkv"])
def test_fused_path_on_the_stand_in_matches_reference(stand_in, head_mode, causal, layout):
    shape = (2, 40, 6, 8)
    made = [make_strided(layout, shape, torch.float64, "cpu", seed) for seed in range(3)]
    seg, dil = [8, 20, 40], [1, 2, 4]
    views = [view for _, view in made]
    out = dilated_attention(
        *views, DilatedPattern(seg, dil, head_mode), is_causal=causal, backend="flash_attn_4"
    )
    inputs = [view.detach().clone().requires_grad_() for view in views]
    expected = reference(*inputs, seg, dil, head_mode=head_mode, is_causal=causal)
    assert_close(out, expected, torch.float64, f"{layout} out")
    g = torch.randn_like(expected)
    leaves = [leaf for leaf, _ in made]
    for name, a, b in zip("qkv", grads(out, leaves, g), grads(expected, inputs, g)):
        assert_close(strided_view(layout, a, shape), b, torch.float64, f"{layout} d{name}")


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_shared_key_value_heads_go_to_the_stand_in_unrepeated(stand_in, head_mode):
    """Key/value with fewer heads go to the kernel as they are (SUPPORTS_GQA), the
    outputs and gradients the reference's; a value head_dim of its own is refused."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 40, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    seg, dil = [8, 20, 40], [1, 2, 4]
    kw = {"head_mode": head_mode, "is_causal": True}
    calls = []
    bwd = flash4._interface()._flash_attn_bwd

    def recording_bwd(q_, k_, *args, **kwargs):
        calls.append((q_.shape[2], k_.shape[2]))
        return bwd(q_, k_, *args, **kwargs)

    flash4._interface()._flash_attn_bwd = recording_bwd
    out = dilated_attention(q, k, v, DilatedPattern(seg, dil, head_mode), backend="flash_attn_4", **kw)
    expected = reference(q, k, v, seg, dil, **kw)
    assert_close(out, expected, torch.float64, "out")
    grad = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, (q, k, v), grad), grads(expected, (q, k, v), grad)):
        assert_close(a, b, torch.float64, f"d{name}")
    # two query heads per key/value head: never repeated for the kernel
    assert calls and all(kv_heads == -(-heads // 2) for heads, kv_heads in calls)
    with pytest.raises(ValueError, match="value head_dim must equal the query's"):
        dilated_attention(q, k, v[..., :8], DilatedPattern(seg, dil, head_mode), backend="flash_attn_4")


def test_auto_runs_the_stand_in_only_from_its_token_floor(stand_in, monkeypatch):
    """ "auto" passes over the backend for calls of fewer batch·seq tokens than its
    AUTO_MIN_TOKENS and takes it from there on."""
    calls = []
    fwd = flash4._interface()._flash_attn_fwd

    def recording_fwd(*args, **kwargs):
        calls.append(args[0].shape)
        return fwd(*args, **kwargs)

    flash4._interface()._flash_attn_fwd = recording_fwd
    q, k, v = (torch.randn(2, 40, 4, 8, dtype=torch.float64) for _ in "qkv")
    pattern = DilatedPattern([8, 20, 40], [1, 2, 4])
    monkeypatch.setattr(flash4.Flash4Backend, "AUTO_MIN_TOKENS", 81)
    dilated_attention(q, k, v, pattern)
    assert calls == []
    monkeypatch.setattr(flash4.Flash4Backend, "AUTO_MIN_TOKENS", 80)
    out = dilated_attention(q, k, v, pattern)
    assert calls
    assert_close(out, reference(q, k, v, [8, 20, 40], [1, 2, 4]), torch.float64, "out")
