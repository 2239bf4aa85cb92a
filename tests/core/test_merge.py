"""The lse merge at large score magnitudes (unnormalised or long-trained models):
float32 results as accurate as dense float32 attention on the same inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from dilated_attention_pytorch.core import merge
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, TOLERANCES, assert_close, relative_error

IDS = [i.name for i in CPU_IMPLS]
SCALES = [1.0, 10.0, 100.0, 1000.0, 3000.0]
PATTERN = ((8, 16, 32), (1, 2, 4))


def _inputs(scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 40, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return q * scale, k * scale, v


def _dense_float32_error(q, k, v):
    """Relative error of dense SDPA in float32 against float64 on the same inputs."""

    def dense(*xs):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in xs), is_causal=True)

    return relative_error(dense(*(x.float() for x in (q, k, v))), dense(q, k, v))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("scale", SCALES)
def test_merged_weights_sum_to_one(impl, scale):
    """With every value 1 the output is the sum of the merged weights: 1, not the
    number of branches that share the row's largest score."""
    q, k, _ = (x.float() for x in _inputs(scale))
    out = impl(q, k, torch.ones_like(q), *PATTERN, head_mode="all", is_causal=True)
    assert (out - 1).abs().max() <= 1e-5, (out - 1).abs().max()


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("scale", SCALES)
def test_float32_forward_as_accurate_as_dense(impl, head_mode, scale):
    q, k, v = _inputs(scale)
    expected = reference(q, k, v, *PATTERN, head_mode=head_mode, is_causal=True)
    out = impl(*(x.float() for x in (q, k, v)), *PATTERN, head_mode=head_mode, is_causal=True)
    bound = max(TOLERANCES[torch.float32], 4 * _dense_float32_error(q, k, v))
    assert relative_error(out, expected) <= bound


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 10.0])  # beyond, dense float32 gradients fail too
def test_float32_gradients_as_accurate_as_dense(impl, scale):
    q, k, v = (x.requires_grad_() for x in _inputs(scale))
    expected = reference(q, k, v, *PATTERN, head_mode="all", is_causal=True)
    # seeded: with the global generator the incoming gradient, and so the bound, depended on test order
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=expected.dtype)
    expected_grads = torch.autograd.grad(expected, (q, k, v), g)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = impl(qf, kf, vf, *PATTERN, head_mode="all", is_causal=True)
    dense_f = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (qf, kf, vf)), is_causal=True)
    dense_grads = torch.autograd.grad(dense_f.transpose(1, 2), (qf, kf, vf), g.float())
    q64, k64, v64 = (x.detach().requires_grad_() for x in (q, k, v))
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q64, k64, v64)), is_causal=True)
    dense_exact = torch.autograd.grad(dense.transpose(1, 2), (q64, k64, v64), g)
    for name, a, b, da, db in zip("qkv", torch.autograd.grad(out, (qf, kf, vf), g.float()), expected_grads,
                                  dense_grads, dense_exact):  # fmt: skip
        bound = max(TOLERANCES[torch.float32], 4 * relative_error(da, db))
        assert relative_error(a, b) <= bound, f"d{name}"


def test_merge_by_lse_of_equal_large_lses_halves_the_weights():
    lse = torch.full((3,), 2.0e7)  # float32 cannot hold 2e7 + log(2)
    outs = [torch.ones(3, 2), 3 * torch.ones(3, 2)]
    out, merged = merge.merge_by_lse(outs, [lse, lse])
    assert torch.equal(out, 2 * torch.ones(3, 2))
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("terms", [2, 5])
def test_online_merge_equals_merge_by_lse(terms):
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(4, 6, 3, generator=g, dtype=torch.float64) for _ in range(terms)]
    lses = [torch.randn(4, 6, generator=g, dtype=torch.float64) * 1e4 for _ in range(terms)]
    lses[0][0] = -math.inf
    for lse in lses:
        lse[1] = -math.inf  # a row with no key anywhere
    acc, top, total = (
        torch.zeros(4, 6, 3, dtype=torch.float64),
        torch.full((4, 6), -math.inf),
        torch.zeros(4, 6),
    )
    top, total = top.double(), total.double()
    for o, lse in zip(outs, lses):
        merge.merge_online(acc, top, total, o, lse)
    out, lse = merge.merge_finish(acc, top, total)
    expected, expected_lse = merge.merge_by_lse(outs, lses)
    assert_close(out, expected, torch.float64, "out")
    assert torch.equal(lse == -math.inf, expected_lse == -math.inf)
    finite = torch.isfinite(expected_lse)
    assert_close(lse[finite], expected_lse[finite], torch.float64, "lse")
    assert torch.equal(out[1], torch.zeros(6, 3, dtype=torch.float64))


def _indexed_case(device: str, head_dim: int = 3):
    """Accumulators ``(1, 1, 20, heads, d)`` views (heads 1, 3 of 4) and parts at 7 scattered rows."""
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(20, 4, head_dim, generator=g).to(device)
    top = (torch.randn(20, 4, generator=g) * 100).to(device)
    total = (torch.rand(20, 4, generator=g) + 0.5).to(device)
    top[2], total[2] = -math.inf, 0.0  # no key yet
    rows = torch.tensor([2, 5, 6, 11, 12, 17, 19], device=device)
    part = torch.randn(1, 1, 7, 2, head_dim, generator=g).to(device)
    part_lse = (torch.randn(1, 1, 7, 2, generator=g) * 100).to(device)
    part_lse[0, 0, 3] = -math.inf  # the part has no key there
    return acc, top, total, rows, part, part_lse


def test_indexed_merge_into_equals_the_merge_of_the_taken_rows():
    """``merge_into(..., rows)`` merges part row i into accumulator row rows[i] and
    leaves every other row (and head) untouched."""
    acc, top, total, rows, part, part_lse = _indexed_case("cpu")
    views = [x[:, 1::2][None, None] for x in (acc, top, total)]
    expected = [x.clone() for x in (acc, top, total)]
    taken = [x[:, 1::2][rows][None, None].clone() for x in expected]
    merge.merge_online(*taken, part, part_lse)
    for x, t in zip(expected, taken):
        x[:, 1::2][rows] = t[0, 0]
    merge.merge_into(*views, part, part_lse, rows)
    for name, a, b in zip(("acc", "top", "total"), (acc, top, total), expected):
        torch.testing.assert_close(a, b, msg=name)


def test_add_at_rows_sums_in_the_destination_dtype():
    """``add_at_rows``: float32 sums of bf16 parts at scattered rows of a strided
    destination, other rows and heads untouched."""
    acc, _, _, rows, part, _ = _indexed_case("cpu")
    part = part[0, 0].to(torch.bfloat16)
    expected = acc.clone()
    expected[:, 1::2][rows] += part.float()
    merge.add_at_rows(acc[:, 1::2], rows, part)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, expected)


def test_static_layouts_are_bounded(monkeypatch):
    """The merge kernel is compiled for at most ``STATIC_LAYOUTS_MAX`` branch layouts
    (segments clipped to shorter sequences give one per length); later layouts
    read theirs from memory, those already compiled keep their kernel."""
    from dilated_attention_pytorch import DilatedPattern
    from dilated_attention_pytorch.pattern import compact_rows

    monkeypatch.setattr(merge, "_STATIC_LAYOUTS", set())
    monkeypatch.setattr(merge, "STATIC_LAYOUTS_MAX", 2)
    pattern = DilatedPattern((4, 16), (1, 2), "all")

    def buffers(n: int) -> merge.BranchBuffers:
        rows = compact_rows(pattern, pattern.calls(n, 2, diagonal=True), n, 2)
        assert rows is not None
        return merge.BranchBuffers(rows, 1, 2, 8, torch.float32, torch.device("cpu"))

    first, second, third = (merge.static_layout(buffers(n)) for n in (8, 12, 10))
    assert first == ((4, 1, 4), (8, 2, 4)) and second == ((4, 1, 4), (12, 2, 6))
    assert third is None
    assert merge.static_layout(buffers(8)) == first
    assert merge.static_layout(buffers(24)) is None  # (16, 2, 8): a third layout
