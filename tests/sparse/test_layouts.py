"""Block layouts: shapes, the always-kept diagonal, sparsity, reproducibility,
the Hilbert ordering."""

import pytest
import torch

from dilated_attention_pytorch.sparse import layouts

NAMED = ["local_window", "dilated_sparse", "global_local", "random", "hilbert"]


@pytest.mark.parametrize("pattern", NAMED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_layout_shape_diagonal_and_sparsity(pattern, causal, sparsity):
    n = 80
    layout = layouts.make_layout(pattern, n, sparsity, causal=causal, seed=3)
    assert layout.shape == (n, n) and layout.dtype == torch.bool
    assert layout.diagonal().all(), "the local block must always be kept"
    if causal:
        assert not layout.triu(1).any(), "nothing above the diagonal when causal"
    actual = layouts.layout_sparsity(layout, causal)
    assert abs(actual - sparsity) <= 0.06, f"{pattern}: sparsity {actual:.3f} for target {sparsity}"


@pytest.mark.parametrize("pattern", NAMED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zero_sparsity_keeps_everything(pattern, causal):
    layout = layouts.make_layout(pattern, 17, 0.0, causal=causal)
    expected = torch.ones(17, 17, dtype=torch.bool)
    assert torch.equal(layout, expected.tril() if causal else expected)


def test_random_layout_is_reproducible_from_its_seed():
    a = layouts.make_layout("random", 64, 0.8, seed=7)
    b = layouts.make_layout("random", 64, 0.8, seed=7)
    c = layouts.make_layout("random", 64, 0.8, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_local_window_is_a_band_and_dilated_sparse_strides():
    local = layouts.make_layout("local_window", 40, 0.9)
    dist = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    width = int(dist[local].abs().max())
    assert torch.equal(local, dist.abs() <= width)
    strided = layouts.make_layout("dilated_sparse", 40, 0.9)
    stride = int(dist[strided & (dist > 0)].min())
    assert stride > 1 and torch.equal(strided, dist.remainder(stride) == 0)


def test_global_local_has_global_rows_and_columns():
    layout = layouts.make_layout("global_local", 64, 0.8)
    assert layout[:, 0].all() and layout[0, :].all()


def test_callable_pattern_gets_its_diagonal():
    def only_first_column(n):
        out = torch.zeros(n, n, dtype=torch.bool)
        out[:, 0] = True
        return out

    layout = layouts.make_layout(only_first_column, 9, 0.5, causal=True)
    assert layout[:, 0].all() and layout.diagonal().all() and layout.sum() == 2 * 9 - 1


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda n: torch.ones(n, n), "bool tensor"),
        (lambda n: torch.ones(n + 1, n + 1, dtype=torch.bool), "n_blocks=9"),
        (lambda n: [[True]], "bool tensor"),
    ],
)
def test_callable_pattern_must_return_a_bool_layout(bad, match):
    with pytest.raises(ValueError, match=match):
        layouts.make_layout(bad, 9, 0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, "0.5", True])
def test_sparsity_is_validated(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a float in"):
        layouts.make_layout("local_window", 8, sparsity)


def test_unknown_pattern():
    with pytest.raises(ValueError, match="pattern must be one of"):
        layouts.make_layout("strided", 8, 0.5)


def test_expand_layout():
    layout = torch.tensor([[True, False], [False, True]])
    full = layouts.expand_layout(layout, 3, 5)
    assert full.shape == (5, 5)
    assert full[:3, :3].all() and full[3:, 3:].all() and not full[:3, 3:].any() and not full[3:, :3].any()


@pytest.mark.parametrize("shape", [(8, 8), (16, 16), (5, 7), (1, 9), (12, 3)])
def test_hilbert_order_is_a_permutation(shape):
    order = layouts.hilbert_order(*shape)
    n = shape[0] * shape[1]
    assert torch.equal(order.sort().values, torch.arange(n))
    inverse = torch.argsort(order)
    assert torch.equal(order[inverse], torch.arange(n)) and torch.equal(inverse[order], torch.arange(n))


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_hilbert_order_steps_to_a_grid_neighbour(side):
    order = layouts.hilbert_order(side, side)
    y, x = order // side, order % side
    steps = (y.diff().abs() + x.diff().abs()).tolist()
    assert steps == [1] * (side * side - 1)


def test_hilbert_blocks_are_2d_neighbourhoods():
    # 16 consecutive cells along the curve of a 16x16 grid form a 4x4 square
    order = layouts.hilbert_order(16, 16)
    for block in order.view(-1, 16):
        y, x = block // 16, block % 16
        assert int(y.max() - y.min()) == 3 and int(x.max() - x.min()) == 3


def test_hilbert_order_validates_its_shape():
    with pytest.raises(ValueError, match="spatial_shape height must be a positive int"):
        layouts.hilbert_order(0, 4)
