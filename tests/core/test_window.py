"""Queries at the end of the keys (``seqlen_q <= seqlen_k``): the last rows of
the full-length function, for every implementation, with masks and shared
key/value heads."""

import math

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern, dilated_attention
from dilated_attention_pytorch.core import window as window_module
from dilated_attention_pytorch.core.window import QueryWindow
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, assert_close

PATTERN = ((4, 8, 6), (1, 2, 3))  # lcm 24: windows start at 0, 24, 48
SEQ_K = 53


def _inputs(seq_q, heads=4, kv_heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_q, heads, d, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (
        torch.randn(2, SEQ_K, kv_heads, d, generator=g, dtype=torch.float64).requires_grad_()
        for _ in range(2)
    )
    return q, k, v


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("seq_q", [1, 5, 29, 30, SEQ_K])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_last_rows_of_the_full_function(impl, seq_q, head_mode, causal):
    q, k, v = _inputs(seq_q)
    # the full-length call with these queries as its last rows
    q_full = torch.cat([torch.randn(2, SEQ_K - seq_q, 4, 4, dtype=torch.float64), q], 1)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    full = reference(q_full, k, v, *PATTERN, head_mode=head_mode, is_causal=causal)[:, SEQ_K - seq_q :]
    expected_grads = torch.autograd.grad(full, (q, k, v), grad_out)
    out = impl(q, k, v, *PATTERN, head_mode=head_mode, is_causal=causal)
    assert_close(out, full, torch.float64, f"{impl.name} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("mask_dim", [2, 4])
@pytest.mark.parametrize("seq_q", [1, 20])
def test_rectangular_masks(impl, mask_dim, seq_q):
    q, k, v = _inputs(seq_q)
    gen = torch.Generator().manual_seed(5)
    kpm = torch.rand(2, SEQ_K, generator=gen) < 0.25
    shape = (seq_q, SEQ_K) if mask_dim == 2 else (2, 4, seq_q, SEQ_K)
    attn = torch.rand(shape, generator=gen) < 0.2
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    kw = {"head_mode": "all", "is_causal": True, "key_padding_mask": kpm, "attn_mask": attn}
    expected = reference(q, k, v, *PATTERN, **kw)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out = impl(q, k, v, *PATTERN, **kw)
    assert_close(out, expected, torch.float64, f"{impl.name} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


@pytest.mark.parametrize("seq_q,seq_k", [(1, 53), (5, 53), (30, 53), (53, 53), (1, 24), (7, 100)])
def test_window_starts_at_a_multiple_of_every_segment_length(seq_q, seq_k):
    pattern = DilatedPattern(*PATTERN)
    window = QueryWindow.of(pattern, seq_q, seq_k)
    assert all(window.start % w == 0 for w in PATTERN[0])
    assert window.start + window.pad == seq_k - seq_q
    assert 0 <= window.pad < math.lcm(*PATTERN[0])


@pytest.mark.filterwarnings("ignore:query has")
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_one_query_reads_only_its_keys_at_every_position(monkeypatch, head_mode, kv_heads):
    """A decoding step (one query) at every position of three periods: the last
    row of the full function, without running the query window."""

    def no_window(*args):
        raise AssertionError("one query ran the query window")

    monkeypatch.setattr(window_module.QueryWindow, "of", no_window)
    gen = torch.Generator().manual_seed(1)
    k_all, v_all = (torch.randn(1, 72, kv_heads, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    q_all = torch.randn(1, 72, 6, 3, generator=gen, dtype=torch.float64)
    full = reference(q_all, k_all, v_all, *PATTERN, head_mode=head_mode, is_causal=True)
    for n in range(2, 73):
        out = dilated_attention(
            q_all[:, n - 1 : n], k_all[:, :n], v_all[:, :n], *PATTERN, head_mode=head_mode
        )
        assert_close(out, full[:, n - 1 : n], torch.float64, f"position {n - 1}")
