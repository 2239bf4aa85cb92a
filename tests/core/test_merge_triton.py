"""The Triton lse merges (:mod:`dilated_attention_pytorch.core.merge_triton`)
against the torch merges they replace on CUDA. Marked ``gpu`` and ``triton``:
without a GPU they run under ``TRITON_INTERPRET=1``."""

import pytest
import torch

from dilated_attention_pytorch.core import merge, views
from dilated_attention_pytorch.core import merge_triton as triton_merge

from ..conftest import TRITON_DEVICE as DEVICE

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_triton_merge_matches_torch_merge(head_dim):

    g = torch.Generator(device=DEVICE).manual_seed(0)
    acc = torch.randn(2, 30, 6, head_dim, device=DEVICE, generator=g)
    top = torch.randn(2, 30, 6, device=DEVICE, generator=g) * 1000  # large scores
    total = torch.rand(2, 30, 6, device=DEVICE, generator=g) + 0.5
    top[0, :4], total[0, :4] = float("-inf"), 0.0  # rows with no key yet

    # strided views like the branch problems: every 3rd position, heads 1, 3, 5
    def view(x):
        return x[:, 1::3].unflatten(1, (5, 2))[:, :, :, 0::2]

    out5, top4, total4 = view(acc), view(top), view(total)
    part = torch.randn(out5.shape, device=DEVICE, generator=g).to(torch.bfloat16)
    part_lse = top4.nan_to_num(neginf=0.0) + torch.randn(top4.shape, device=DEVICE, generator=g)
    part_lse[1, 0] = float("-inf")  # the part has no key for some rows
    part_lse[0, 0, 0] = float("-inf")  # and neither has the accumulator there
    expected = [x.clone() for x in (out5, top4, total4)]
    merge.merge_online(*expected, part.float(), part_lse)
    untouched = acc.clone()
    triton_merge.merge_into(out5, top4, total4, part, part_lse)
    for name, a, b in zip(("acc", "top", "total"), (out5, top4, total4), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.isfinite(out5).all()
    # positions outside the views are not written
    mask = torch.ones_like(acc, dtype=torch.bool)
    view(mask).fill_(False)
    assert torch.equal(acc[mask], untouched[mask])


@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("weighted", [True, False], ids=["lse_merge", "sum"])
@pytest.mark.parametrize("n", [100, 96], ids=["partial_segments", "adopted"])
def test_triton_branch_merge_matches_torch(monkeypatch, head_dim, weighted, n):
    """Both merges from compact rows; at n = 96 the dilation-1 branch is one call,
    whose (strided) result the merges read instead of its rows."""
    from dilated_attention_pytorch.pattern import DilatedPattern, compact_rows, split_heads, whole_branch

    b, h = 2, 7
    pattern = DilatedPattern((16, 32, 24), (1, 3, 5), "all")  # w % r != 0
    rows = compact_rows(pattern, pattern.calls(n, h), n, h)
    adopted = whole_branch(rows, pattern.calls(n, h), h)
    assert adopted == (0 if n == 96 else None)
    heads = range(3, 6)  # a chunk of heads: the output is a strided slice
    device = torch.device(DEVICE)
    parts = merge.BranchBuffers(rows, b, len(heads), head_dim, torch.bfloat16, device, adopted)
    lses = merge.BranchBuffers(rows, b, len(heads), None, torch.float32, device, adopted)
    parts.flat.fill_(float("nan"))  # rows no call writes must never be read
    lses.flat.fill_(float("nan"))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for piece in split_heads(pattern.calls(n, h), len(heads)):
        if piece.head_start not in heads:
            continue
        if piece.branch == adopted:
            # a kernel's result in problem layout (batch·segments, heads, length, head_dim)
            shape = (b * piece.num_segments, piece.num_heads, piece.length)
            parts.adopt(views.from_problem(torch.randn(*shape, head_dim, device=DEVICE, generator=g), b))
            lses.adopt(views.from_problem(torch.randn(*shape, device=DEVICE, generator=g) * 3, b))
            continue
        to_call = rows[piece.branch].call_rows(piece, heads.start)
        part5 = views.strided(parts.blocks[piece.branch], to_call)
        lse4 = views.strided(lses.blocks[piece.branch], to_call)
        part5.copy_(torch.randn(part5.shape, device=DEVICE, generator=g))
        lse4.copy_(torch.randn(lse4.shape, device=DEVICE, generator=g) * 3)
        lse4[0, 0, :2] = float("-inf")  # rows without a key in this branch
    lse_arg = lses if weighted else None
    launched = []  # the adopted branch and the compiled-in layout of each kernel launch
    real = triton_merge.merge_branches
    monkeypatch.setattr(
        triton_merge,
        "merge_branches",
        lambda *a, **k: launched.append((a[7], k["static_meta"])) or real(*a, **k),
    )
    monkeypatch.setattr(merge, "_STATIC_LAYOUTS", set())
    results = []
    for use_triton in (True, False):
        full = torch.full((b, n, h, head_dim), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        full_lse = torch.full((b, n, h), float("nan"), device=DEVICE)
        monkeypatch.setattr(triton_merge, "can_merge_branches", lambda *args, on=use_triton: on)
        out, lse = full[:, :, heads.start : heads.stop], full_lse[:, :, heads.start : heads.stop]
        merge.merge_branches(out, lse if weighted else None, rows, parts, lse_arg, heads)
        assert len(launched) == 1 and (launched[0][0] is None) == (adopted is None)
        assert launched[0][1] == tuple(row[:3] for row in parts.meta)
        assert torch.isfinite(out).all()
        assert full[:, :, : heads.start].isnan().all() and full[:, :, heads.stop :].isnan().all()
        results.append((out.float(), lse))
    assert len(launched) == 1  # the torch merge launched nothing
    # the layout read from memory gives the same result as compiled in, bit for bit
    full = torch.full((b, n, h, head_dim), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    full_lse = torch.full((b, n, h), float("nan"), device=DEVICE)
    out, lse = full[:, :, heads.start : heads.stop], full_lse[:, :, heads.start : heads.stop]
    meta, offsets = merge._branch_meta(parts, device)
    adopted_rows = None
    if adopted is not None:
        adopted_rows = (parts.adopted_index, parts.adopted_rows(), lses.adopted_rows() if weighted else None)
    real(
        out, lse if weighted else None, parts.flat, lses.flat if weighted else None, meta, offsets,
        heads.start, adopted_rows, static_meta=None,
    )  # fmt: skip
    assert torch.equal(out.float(), results[0][0])
    if weighted:
        assert torch.equal(lse, results[0][1])
    (out, lse), (expected, expected_lse) = results
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    if weighted:
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
        if adopted is None:
            assert (lse == float("-inf")).any()  # some positions have no key in any branch


@pytest.mark.parametrize("head_dim", [64, 40])
def test_indexed_triton_merge_matches_torch_merge(head_dim):
    """Parts merged at scattered rows of strided accumulators (packed documents)."""
    from ..core.test_merge import _indexed_case

    acc, top, total, rows, part, part_lse = _indexed_case(DEVICE, head_dim)
    cpu = [x.cpu() for x in (acc, top, total)]
    merge.merge_into(*(x[:, 1::2][None, None] for x in cpu), part.cpu(), part_lse.cpu(), rows.cpu())
    triton_merge.merge_into(*(x[:, 1::2][None, None] for x in (acc, top, total)), part, part_lse, rows)
    for name, a, b in zip(("acc", "top", "total"), (acc, top, total), cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("head_dim", [64, 40])
def test_triton_add_at_rows_matches_index_add(head_dim):
    from ..core.test_merge import _indexed_case

    acc, _, _, rows, part, _ = _indexed_case(DEVICE, head_dim)
    part = part[0, 0].to(torch.bfloat16)
    expected = acc.clone()
    expected[:, 1::2].index_add_(0, rows, part.float())
    assert triton_merge.can_add_at_rows(acc[:, 1::2], part)
    triton_merge.add_at_rows(acc[:, 1::2], rows, part)
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-6)
