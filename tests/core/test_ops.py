"""The fused path's registered operators: torch.library's own checks (schema,
fake implementation, autograd registration), no graph break under
``torch.compile(fullgraph=True)``, compiled equal to eager, ``torch.export``."""

import pytest
import torch

from dilated_attention_pytorch import ImprovedMultiheadDilatedAttention, LongNetLM, dilated_attention
from dilated_attention_pytorch.core import fused, ops

from ..conftest import assert_close

SEG, DIL = (4, 8, 16), (1, 2, 4)


def _qkv(heads=4, kv_heads=2, seq=37, dtype=torch.float32, value_dim=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, seq, heads, 8, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(2, seq, kv_heads, 8, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, seq, kv_heads, value_dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("head_slice", [[], [2, 8]], ids=["layer", "head-slice"])
@pytest.mark.parametrize("value_dim", [8, 5], ids=["one-head-dim", "value-head-dim"])
def test_opcheck(head_mode, masked, head_slice, value_dim):
    """Schema, fake tensors, autograd registration and dispatch, as torch.library checks them."""
    q, k, v = _qkv(dtype=torch.float64, value_dim=value_dim)
    key_bias = torch.zeros(2, 37, dtype=torch.float64) if masked else None
    if masked:
        key_bias[:, 3] = -torch.inf
    args = (q, k, v, key_bias, None, list(SEG), list(DIL), head_mode, head_slice, True, 0.3, None)
    torch.library.opcheck(ops.fused_forward_op, args)
    out, lse = ops.fused_forward_op(*args)
    grad_out = torch.randn_like(out)
    back = (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, key_bias, None, *args[5:])
    torch.library.opcheck(ops.fused_backward_op, back)


def _function(q, k, v):
    return dilated_attention(q, k, v, SEG, DIL, head_mode="all", is_causal=True)


@pytest.mark.parametrize("value_dim", [8, 5], ids=["one-head-dim", "value-head-dim"])
def test_function_compiles_without_graph_breaks_and_equals_eager(value_dim):
    q, k, v = _qkv(value_dim=value_dim)
    assert torch._dynamo.explain(_function)(q, k, v).graph_break_count == 0
    compiled = torch.compile(_function, fullgraph=True)
    out, expected = compiled(q, k, v), _function(q, k, v)
    assert_close(out, expected, torch.float32, "output")
    g = torch.randn_like(out)
    for name, a, b in zip(
        "qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)
    ):
        assert_close(a, b, torch.float32, f"d{name}")


@pytest.mark.slow
def test_multihead_and_longnet_lm_compile_with_fullgraph():
    torch.manual_seed(0)
    mha = ImprovedMultiheadDilatedAttention(
        32, 4, num_kv_heads=2, segment_lengths=SEG, dilation_rates=DIL, batch_first=True,
        position_embedding="rotary",
    )  # fmt: skip
    x = torch.randn(2, 40, 32, requires_grad=True)
    compiled = torch.compile(mha, fullgraph=True)
    out, expected = compiled(x, x, x, is_causal=True)[0], mha(x, x, x, is_causal=True)[0]
    assert_close(out, expected, torch.float32, "multihead output")
    params = [x, *mha.parameters()]
    for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(expected.sum(), params)):
        assert_close(a, b, torch.float32, "multihead gradient")
    lm = LongNetLM(50, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, segment_lengths=SEG,
                   dilation_rates=DIL, num_kv_heads=2)  # fmt: skip
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch._dynamo.explain(lm)(ids).graph_break_count == 0
    assert_close(torch.compile(lm, fullgraph=True)(ids), lm(ids), torch.float32, "LongNetLM logits")


def test_export_of_a_model_with_the_module():
    torch.manual_seed(0)
    mha = ImprovedMultiheadDilatedAttention(32, 4, num_kv_heads=2, segment_lengths=SEG, dilation_rates=DIL,
                                            batch_first=True).eval()  # fmt: skip

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, is_causal=True)[0]

    x = torch.randn(2, 40, 32)
    exported = torch.export.export(Model(), (x,))
    assert any("dilated_attention.fused_forward" in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        assert_close(exported.module()(x), Model()(x), torch.float32, "exported")


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_stacked_backward_opcheck_and_equal_to_the_plain_one(monkeypatch, head_mode):
    """Query, key and value as one tensor's slices: the backward writes their
    gradients into one ``(batch, seq, 3, heads, head_dim)`` tensor, bit for bit the
    plain backward's; the autograd formula takes it for such inputs only."""
    qkv = torch.randn(2, 37, 3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.unbind(2)
    args = (q, k, v, None, None, list(SEG), list(DIL), head_mode, [], True, 0.3, None)
    out, lse = ops.fused_forward_op(*args)
    back = (torch.randn_like(out), q, k, v, out, lse, None, None, *args[5:])
    torch.library.opcheck(ops.fused_backward_stacked_op, back)
    stacked = ops.fused_backward_stacked_op(*back)
    assert stacked.shape == qkv.shape
    assert all(torch.equal(a, b) for a, b in zip(stacked.unbind(2), ops.fused_backward_op(*back)))

    taken = []
    real = fused.stacked_view
    monkeypatch.setattr(fused, "stacked_view", lambda *a: taken.append(real(*a) is not None) or real(*a))
    leaf = qkv.clone().requires_grad_()
    dilated_attention(*leaf.unbind(2), SEG, DIL, head_mode=head_mode, is_causal=True).sum().backward()
    separate = [x.clone().requires_grad_() for x in (q, k, v)]
    dilated_attention(*separate, SEG, DIL, head_mode=head_mode, is_causal=True).sum().backward()
    assert taken == [True, False]  # the stacked backward for the slices only
    assert all(torch.equal(a, b.grad) for a, b in zip(leaf.grad.unbind(2), separate))
