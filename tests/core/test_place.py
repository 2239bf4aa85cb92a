"""Grouped-head results written region by region (:mod:`dilated_attention_pytorch.core.place`):
the torch version on CPU, and the Triton kernel against it (``gpu``/``triton``:
without a GPU it runs under ``TRITON_INTERPRET=1``)."""

import math

import pytest
import torch

from dilated_attention_pytorch.core import place, place_triton, views
from dilated_attention_pytorch.pattern import BranchCall, DilatedPattern

from ..conftest import TRITON_DEVICE

#: calls of both head modes' shapes: partial segments, w % r != 0, an offset, a
#: diagonal, strided heads, a call without queries
CALLS = [
    *DilatedPattern((4, 8), (1, 2), "grouped").calls(19, 4),
    *DilatedPattern((6, 16, 5), (1, 3, 2), "grouped").calls(21, 5),
    BranchCall(0, 1, 3, 5, 7, 2, 2, 1, 2, 2),  # heads 1, 3 at offset 1, w % r != 0
    BranchCall(0, 0, 3, 0, 9, 2, 3, 0, 1, 3, offset_step=1),  # a diagonal
    BranchCall(0, 2, 4, 16, 3, 1, 0, 0, 1, 2),  # no position selected
]


def _case(call: BranchCall, dtype: torch.dtype, head_dim: int, device: str):
    g = torch.Generator().manual_seed(0)
    b, n, h = 2, 24, 6
    # destinations as views: every other head of a wider tensor (non-unit head stride)
    dest = torch.full((b, n, 2 * h, head_dim), math.nan, dtype=dtype).to(device)[:, :, ::2]
    dest_lse = torch.full((b, n, 2 * h), math.nan).to(device)[:, :, ::2]
    shape = (b, call.num_segments, call.length, call.num_heads)
    # parts transposed as kernels return them (length and heads swapped in memory)
    part = torch.randn(*shape, head_dim, generator=g).to(dtype).to(device).transpose(2, 3).contiguous()
    part = part.transpose(2, 3)
    part_lse = torch.randn(shape, generator=g).to(device)
    return dest, dest_lse, part, part_lse


def _expected(dest, dest_lse, call, part, part_lse):
    dest, dest_lse = dest.clone(), dest_lse.clone()
    views.region(dest, call).zero_()
    views.region(dest_lse, call).fill_(-math.inf)
    if call.length:
        views.strided(dest, call).copy_(part)
        views.strided(dest_lse, call).copy_(part_lse)
    return dest, dest_lse


@pytest.mark.parametrize("call", CALLS, ids=repr)
def test_place_writes_the_region_and_nothing_else(call):
    dest, dest_lse, part, part_lse = _case(call, torch.float64, 3, "cpu")
    expected, expected_lse = _expected(dest, dest_lse, call, part, part_lse)
    place.place_result(dest, dest_lse, call, part, part_lse)
    # NaN outside the region stays NaN, so equal_nan compares exactly what was written
    torch.testing.assert_close(dest, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dest_lse, expected_lse, rtol=0, atol=0, equal_nan=True)
    assert not views.region(dest, call).isnan().any()


def test_place_without_a_part_zeroes_the_region():
    call = CALLS[0]
    dest, dest_lse, _, _ = _case(call, torch.float32, 3, "cpu")
    place.place_result(dest, dest_lse, call, None)
    assert (views.region(dest, call) == 0).all() and (views.region(dest_lse, call) == -math.inf).all()
    assert dest.isnan().sum() == dest.numel() - views.region(dest, call).numel()


def test_region_holds_the_calls_positions_and_heads():
    call = BranchCall(0, 1, 2, 4, 6, 2, 3, 1, 2, 2)
    x = torch.arange(2 * 20 * 6).reshape(2, 20, 6)
    r = views.region(x, call)
    assert r.shape == (2, 12, 2)
    assert torch.equal(r, x[:, 4:16, 1:4:2])


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("call", CALLS, ids=repr)
def test_triton_place_matches_torch(monkeypatch, call, head_dim, dtype):
    dest, dest_lse, part, part_lse = _case(call, dtype, head_dim, TRITON_DEVICE)
    results = []
    for on in (True, False):
        monkeypatch.setattr(place_triton, "can_place", lambda *a, on=on: on)
        d, d_lse = dest.clone(), dest_lse.clone()
        place.place_result(d, d_lse, call, part, part_lse)
        results.append((d, d_lse))
    (out, lse), (expected, expected_lse) = results
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0, equal_nan=True)
    if call.length:
        monkeypatch.undo()
        assert place_triton.can_place(views.region(dest, call), part, call)
