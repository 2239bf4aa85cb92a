"""Beyond one backward: double backward (gradient penalties, gradgradcheck) and
torch.func (grad, jacrev, vmap, batched gradients) through every single-device
implementation, exact against the reference."""

import pytest
import torch
from torch import nn

from dilated_attention_pytorch import (
    BlockSparseRingMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
)
from dilated_attention_pytorch.core import fused
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, HEAD_MODES_ALL_SLOW, TOLERANCES, assert_close, make_qkv

IDS = [i.name for i in CPU_IMPLS]
PATTERN = ((2, 4, 7), (1, 2, 3))
KPM = torch.tensor([[False, False, True, False, False, False, True]])


def _fn(impl, head_mode):
    def fn(q, k, v):
        return impl(q, k, v, *PATTERN, head_mode=head_mode, is_causal=True, key_padding_mask=KPM)

    return fn


def _reference(head_mode):
    def fn(q, k, v):
        return reference(q, k, v, *PATTERN, head_mode=head_mode, is_causal=True, key_padding_mask=KPM)

    return fn


# every fused backend's double backward differentiates the same recomputation
TWICE = [i for i in CPU_IMPLS if i.backend is None]


@pytest.mark.parametrize("impl", TWICE, ids=[i.name for i in TWICE])
@pytest.mark.parametrize("head_mode", HEAD_MODES_ALL_SLOW)
def test_gradgradcheck(impl, head_mode):
    assert torch.autograd.gradgradcheck(_fn(impl, head_mode), make_qkv(1, 7, 2, 2))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("head_mode", HEAD_MODES_ALL_SLOW)
def test_batched_gradcheck(impl, head_mode):
    assert torch.autograd.gradcheck(_fn(impl, head_mode), make_qkv(1, 7, 3, 2), check_batched_grad=True)


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_second_order_gradients_of_a_penalty_match_reference(impl, head_mode):
    """A gradient penalty: the gradient of |d(loss)/dq|^2 with respect to q, k, v."""
    results = []
    for fn in (_fn(impl, head_mode), _reference(head_mode)):
        q, k, v = make_qkv(1, 7, 3, 2, seed=1)
        (dq,) = torch.autograd.grad(fn(q, k, v).sin().sum(), q, create_graph=True)
        results.append(torch.autograd.grad(dq.square().sum(), (q, k, v)))
    for name, a, b in zip("qkv", *results):
        assert_close(a, b, torch.float64, f"{impl.name} penalty d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_torch_func_transforms_match_reference(impl, head_mode):
    q, k, v = make_qkv(1, 7, 3, 2, requires_grad=False)
    fn, ref = _fn(impl, head_mode), _reference(head_mode)
    grad = torch.func.grad(lambda q: fn(q, k, v).sin().sum())(q)
    assert_close(grad, torch.func.grad(lambda q: ref(q, k, v).sin().sum())(q), torch.float64, "grad")
    jac = torch.func.jacrev(lambda v: fn(q, k, v))(v)
    assert_close(jac, torch.func.jacrev(lambda v: ref(q, k, v))(v), torch.float64, "jacrev")
    batch = [torch.randn(4, 1, 7, 3, 2, dtype=torch.float64) for _ in range(3)]
    assert_close(torch.func.vmap(fn)(*batch), torch.func.vmap(ref)(*batch), torch.float64, "vmap")
    qg = q.clone().requires_grad_()
    out = fn(qg, k, v)
    cotangents = torch.randn(5, *out.shape, dtype=torch.float64)
    (batched,) = torch.autograd.grad(out, qg, cotangents, is_grads_batched=True)
    one_by_one = torch.stack([torch.autograd.grad(fn(qg, k, v), qg, c)[0] for c in cotangents])
    assert_close(batched, one_by_one, torch.float64, "is_grads_batched")


MODULES = [
    MultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
]


@pytest.mark.parametrize("cls", MODULES, ids=[c.__name__ for c in MODULES])
def test_gradient_penalty_of_a_dense_pattern_equals_nn_multihead_attention(cls):
    """One branch covering the sequence is dense attention: the parameter gradients
    of a gradient penalty equal nn.MultiheadAttention's (they were wrong, without
    error, through the once-differentiable fused backward)."""
    kw = {"sparsity": 0.0} if cls is BlockSparseRingMultiheadDilatedAttention else {}
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = cls(8, 2, batch_first=True, dtype=torch.float64, segment_lengths=[8], dilation_rates=[1], **kw)
    ours.load_state_dict(dense.state_dict())
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    grads = []
    # nn.MultiheadAttention differentiates twice only off its SDPA fast path (need_weights)
    for module, need_weights in ((dense, True), (ours, False)):
        xi = x.clone().requires_grad_()
        out = module(xi, xi, xi, need_weights=need_weights)[0]
        (gx,) = torch.autograd.grad(out.sin().sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), list(module.parameters())))
    for (name, _), a, b in zip(dense.named_parameters(), *grads):
        assert b is not None, name
        assert_close(b, a, torch.float64, name)


def test_functorch_detection():
    q = torch.randn(2, 3)
    assert not fused.functorch_active(q)
    seen = []
    torch.func.vmap(lambda x: seen.append(fused.functorch_active(x)) or x)(q)
    assert seen == [True]
    assert TOLERANCES[torch.float64] < 1e-9
