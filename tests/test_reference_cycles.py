"""A step's tensors are freed when its last reference goes, not when the garbage
collector next runs: no implementation leaves reference cycles that hold
inputs, outputs or gradients (on a GPU those would raise the next step's peak
by an amount that depends on when the collector happens to run)."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import ImprovedMultiheadDilatedAttention

from .conftest import CPU_IMPLS, held_by_cycles, make_qkv


@pytest.fixture
def first_call_done():
    # the first call of the package imports torch._dynamo lazily, and that import
    # leaves frames in a cycle once: done here, outside the measured calls
    q, k, v = make_qkv(1, 16, 2)
    CPU_IMPLS[1](q, k, v, (8,), (1,)).sum().backward()


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_step_leaves_no_cycles(first_call_done, impl, head_mode, causal):
    def step() -> tuple[torch.Tensor, ...]:
        q, k, v = make_qkv(1, 24, 4)
        out = impl(q, k, v, (8, 12), (1, 2), head_mode=head_mode, is_causal=causal)
        out.backward(torch.randn_like(out))
        return q, k, v, out, q.grad, k.grad, v.grad

    assert held_by_cycles(step) == [], "held by a reference cycle (q, k, v, out, dq, dk, dv)"


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_a_module_step_leaves_no_cycles(first_call_done, head_mode):
    def step() -> tuple[object, ...]:
        module = ImprovedMultiheadDilatedAttention(
            32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], head_mode=head_mode, batch_first=True
        )
        x = torch.randn(1, 32, 32, requires_grad=True)
        out = module(x, x, x, is_causal=True, need_weights=False)[0]
        out.backward(torch.ones_like(out))
        return x, out, x.grad, module

    assert held_by_cycles(step) == [], "held by a reference cycle (x, out, dx, module)"
