import dataclasses
import itertools

import pytest
import torch

from dilated_attention_pytorch.pattern import (
    DilatedPattern,
    as_pattern,
    compact_rows,
    kv_call,
    kv_head,
    selected_count,
    split_for_kv,
    split_heads,
)
from dilated_attention_pytorch.reference import branch_mask

from .conftest import PATTERNS


def test_head_groups_first_groups_get_the_extra_heads():
    p = DilatedPattern([4, 8, 16], [1, 2, 4])
    assert [len(g) for g in p.head_groups(8)] == [3, 3, 2]
    assert [list(g) for g in p.head_groups(8)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [len(g) for g in p.head_groups(2)] == [1, 1, 0]


def test_offsets_grouped_and_all():
    grouped = DilatedPattern([4, 8, 16], [1, 2, 4])
    # group i uses offset i % r_i, only in its own branch
    assert grouped.head_offset(2, 7, 8) == 2 % 4
    assert grouped.head_offset(1, 4, 8) == 1
    assert grouped.head_offset(0, 7, 8) is None
    every = DilatedPattern([4, 8, 16], [1, 2, 4], "all")
    assert [every.head_offset(2, j, 8) for j in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert every.branch_heads(2, 6) == [
        (0, range(0, 6, 4)),
        (1, range(1, 6, 4)),
        (2, range(2, 6, 4)),
        (3, range(3, 6, 4)),
    ]


def test_segment_bounds_partial_and_short():
    p = DilatedPattern([8], [2])
    assert p.segment_bounds(0, 19) == [(0, 8), (8, 16), (16, 19)]
    assert p.segment_bounds(0, 5) == [(0, 5)]


@pytest.mark.parametrize(
    "segment_length,dilation,offset", list(itertools.product([1, 5, 6, 7], [1, 2, 3, 6], [0, 1, 2, 5]))
)
def test_selected_count(segment_length, dilation, offset):
    expected = sum(1 for t in range(segment_length) if t % dilation == offset)
    if offset < dilation:
        assert selected_count(segment_length, dilation, offset) == expected


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("seg,dil,n,h", PATTERNS)
def test_calls_cover_exactly_the_selected_positions(seg, dil, n, h, head_mode, diagonal):
    p = DilatedPattern(seg, dil, head_mode)
    covered = torch.zeros(p.num_branches, h, n, dtype=torch.int64)
    for call in p.calls(n, h, diagonal=diagonal):
        for j, head in enumerate(call.heads()):
            pos = call.positions(j)
            # a call's positions are the same segment-relative offsets in each segment
            assert len(pos) == call.num_segments * call.length
            covered[call.branch, head, pos] += 1
    for i in range(p.num_branches):
        # a query is selected iff it may see itself in the branch mask
        selected = branch_mask(p, i, n, h).diagonal(dim1=1, dim2=2)
        assert torch.equal(covered[i], selected.long())


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 16])
@pytest.mark.parametrize("seg,dil,n,h", [*PATTERNS, ((16, 32), (6, 12), 100, 12)])
def test_compact_rows_hold_each_selected_row_once(seg, dil, n, h, chunk, diagonal):
    """Each "all"-mode call (also cut into head chunks) lands on the rows the
    BranchRows formula names, every selected (position, head) exactly once."""
    p = DilatedPattern(seg, dil, "all")
    calls = p.calls(n, h, diagonal=diagonal)
    rows = compact_rows(p, calls, n, h)
    assert rows is not None and set(rows) == set(range(p.num_branches))
    for branch, br in rows.items():
        filled = torch.zeros(br.num_rows, h, dtype=torch.int64)
        for piece in split_heads([c for c in calls if c.branch == branch], chunk):
            first_head = piece.head_start // chunk * chunk
            local = br.call_rows(piece, first_head)
            assert (local.offset, local.offset_step, local.dilation) == (0, 0, 1)
            assert local.segment_length == br.rows_per_segment
            for j, head in enumerate(piece.heads()):
                for pos, row in zip(piece.positions(j), local.positions()):
                    t = pos % br.segment_length
                    assert row == pos // br.segment_length * br.rows_per_segment + t // br.dilation
                    assert t % br.dilation == head % br.dilation
                    filled[row, head] += 1
            assert [j + first_head for j in local.heads()] == piece.heads()
        expected = torch.zeros_like(filled)
        for pos in range(n):
            t = pos % br.segment_length
            for head in range(h):
                if t % br.dilation == head % br.dilation:
                    expected[pos // br.segment_length * br.rows_per_segment + t // br.dilation, head] = 1
        assert torch.equal(filled, expected)


def test_compact_rows_refuse_calls_of_another_layout():
    pattern = DilatedPattern((4, 8), (1, 2), "all")
    all_calls = pattern.calls(19, 4)
    assert compact_rows(pattern, all_calls, 19, 4) is not None
    # grouped heads share one offset; a missing call; a call moved off the segment grid
    grouped = DilatedPattern((4, 8), (1, 2))
    assert compact_rows(grouped, grouped.calls(19, 4), 19, 4) is None
    assert compact_rows(pattern, grouped.calls(19, 4), 19, 4) is None
    assert compact_rows(pattern, all_calls[1:], 19, 4) is None
    moved = [dataclasses.replace(all_calls[0], start=1), *all_calls[1:]]
    assert compact_rows(pattern, moved, 19, 4) is None
    assert compact_rows(pattern, all_calls, 20, 4) is None  # positions the calls do not fill


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16])
def test_split_heads_keeps_the_heads_and_respects_chunks(chunk):
    calls = DilatedPattern((8, 16, 32), (1, 2, 4), "all").calls(40, 12)
    pieces = split_heads(calls, chunk)
    for call in calls:
        mine = [p for p in pieces if (p.branch, p.offset, p.start) == (call.branch, call.offset, call.start)]
        assert [h for p in mine for h in p.heads()] == call.heads()
        assert all(p.head_step == call.head_step and p.num_heads > 0 for p in mine)
    for piece in pieces:
        assert len({h // chunk for h in piece.heads()}) == 1, piece
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        split_heads(calls, 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("seg,dil,n,h", PATTERNS)
def test_flops_count_the_allowed_pairs(seg, dil, n, h, head_mode, causal):
    p = DilatedPattern(seg, dil, head_mode)
    pairs = 0
    for i in range(p.num_branches):
        m = branch_mask(p, i, n, h)
        if causal:
            m = m & torch.ones(n, n, dtype=torch.bool).tril()
        pairs += int(m.sum())
    assert p.flops(n, h, head_dim=8, batch=3, causal=causal) == 4 * pairs * 8 * 3
    assert p.flops(n, h, 8, causal=causal, backward=True) == 4 * pairs * 8 * 7 // 2


@pytest.mark.parametrize(
    "args,error,match",
    [
        (([], []), ValueError, "segment_lengths must not be empty"),
        (([4, 8], [1]), ValueError, "same length"),
        (([4, 0], [1, 1]), ValueError, r"segment_lengths\[1\] must be >= 1"),
        (([4], [-2]), ValueError, r"dilation_rates\[0\] must be >= 1"),
        (([4.0], [1]), TypeError, r"segment_lengths\[0\] must be an int"),
        (([True], [1]), TypeError, r"segment_lengths\[0\] must be an int, got bool"),
        (("48", [1]), TypeError, "segment_lengths must be a sequence"),
        (([4], [1], "dense"), ValueError, "head_mode must be one of"),
    ],
)
def test_pattern_validation(args, error, match):
    with pytest.raises(error, match=match):
        DilatedPattern(*args)


def test_pattern_counts_validation():
    p = DilatedPattern([4], [1])
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        p.calls(0, 2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        p.head_groups(0)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        p.flops(8, 2, 0)


def test_as_pattern():
    p = DilatedPattern([4], [2], "all")
    assert as_pattern(p) is p
    assert as_pattern([4], [2], "all") == p
    with pytest.raises(ValueError, match="dilation_rates must be None"):
        as_pattern(p, [2])
    with pytest.raises(ValueError, match="dilation_rates is required"):
        as_pattern([4])


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (12, 4), (6, 3), (8, 1), (6, 2), (12, 3), (5, 5)])
def test_split_for_kv_keeps_every_head_and_reads_the_rule(head_mode, heads, kv_heads):
    pattern = DilatedPattern((8, 16, 32), (1, 2, 4), head_mode)
    calls = pattern.calls(40, heads)
    parts = split_for_kv(calls, heads, kv_heads)
    covered = sorted((c.branch, c.start, j) for c in parts for j in c.heads())
    assert covered == sorted((c.branch, c.start, j) for c in calls for j in c.heads())
    for part in parts:
        kv, group = kv_call(part, heads, kv_heads)
        assert [kv_head(j, heads, kv_heads) for j in part.heads()] == [
            kv.heads()[i // group] for i in range(part.num_heads)
        ]
        assert kv.positions() == part.positions()
    if heads % (kv_heads * 4) == 0 and head_mode == "all":  # r | group: no call is cut
        assert len(parts) == len(calls)


@pytest.mark.parametrize(
    "seg,dil,h,n,plain,diagonal",
    [
        ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12), 12, 32768, 25, 12),  # W1
        ((2048, 4096, 8192, 16384, 32768, 65536), (1, 2, 4, 8, 16, 32), 16, 65536, 47, 11),  # W2
        ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12), 12, 40000, 50, 24),  # a partial segment
    ],
)
def test_diagonal_calls_batch_the_all_mode_heads(seg, dil, h, n, plain, diagonal):
    p = DilatedPattern(seg, dil, "all")
    assert (len(p.calls(n, h)), len(p.calls(n, h, diagonal=True))) == (plain, diagonal)
    # grouped mode has one offset per branch: nothing to batch
    grouped = DilatedPattern(seg, dil)
    assert grouped.calls(n, h, diagonal=True) == grouped.calls(n, h)


@pytest.mark.parametrize("head_start,total", [(0, 12), (5, 12), (3, 7)])
def test_diagonal_calls_of_a_head_slice_follow_the_layers_offsets(head_start, total):
    """Under head parallelism a rank's heads start mid-layer: its diagonals follow the
    layer's offsets (a run ends where they wrap around)."""
    p = DilatedPattern((8, 16, 24), (2, 4, 6), "all").head_slice(head_start, total)
    h, n = total - head_start, 48
    for call in p.calls(n, h, diagonal=True):
        for j, head in enumerate(call.heads()):
            assert call.head_offsets()[j] == p.head_offset(call.branch, head, h)
            assert call.length == selected_count(call.segment_length, call.dilation, call.head_offsets()[j])


def test_diagonal_calls_refuse_shared_keys():
    calls = DilatedPattern((8,), (4,), "all").calls(16, 4, diagonal=True)
    assert any(c.offset_step for c in calls)
    with pytest.raises(ValueError, match="diagonal calls"):
        split_for_kv(calls, 4, 2)


@pytest.mark.parametrize("n", [64, 70, 5])
@pytest.mark.parametrize("heads", [1, 2, 7])
def test_grouped_calls_tile_their_regions(n, heads):
    """Grouped heads: every (position, head) lies in exactly one call's region
    (partial last segments, calls without queries and empty groups included);
    "all" mode's branches overlap, and a call fewer leaves a gap."""
    from dilated_attention_pytorch.pattern import tiles_regions

    grouped = DilatedPattern((8, 16, 32), (1, 2, 4), "grouped")
    calls = grouped.calls(n, heads)
    assert tiles_regions(calls, n, heads)
    assert not tiles_regions(calls[1:], n, heads)
    assert not tiles_regions(calls, n + 1, heads)
    assert not tiles_regions(calls, n, heads + 1)
    if heads > 1:  # a head outside the layer
        assert not tiles_regions(calls, n, heads - 1)
    assert not tiles_regions(DilatedPattern((8, 16, 32), (1, 2, 4), "all").calls(n, heads), n, heads)


def test_calls_under_torch_compile_warn_of_no_cache_wrapper():
    """Compiled code (the "standard" path traces the pattern) builds the calls without
    the cache wrapper, which dynamo would trace through with a warning."""
    import warnings

    import torch

    pattern = DilatedPattern((4, 8), (1, 2), "all")

    def count(x: torch.Tensor) -> torch.Tensor:
        return x * len(pattern.calls(x.shape[0], 3))

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")
        out = torch.compile(count, backend="eager", fullgraph=True)(torch.ones(16))
    assert out[0].item() == len(pattern.calls(16, 3))
