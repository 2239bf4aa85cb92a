"""Pattern pictures: the masks are the reference's, and the PNG is written."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.reference import branch_mask
from dilated_attention_pytorch.visualize import main, pattern_masks, plot_pattern


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_masks_are_the_reference_branch_masks(head_mode: str, causal: bool) -> None:
    seg, dil, n, h = (4, 8, 12), (1, 2, 3), 20, 4
    masks = pattern_masks(seg, dil, n, h, head_mode, causal)
    assert masks.shape == (3, h, n, n) and masks.dtype == torch.bool
    pattern = DilatedPattern(seg, dil, head_mode)
    for i in range(3):
        expected = branch_mask(pattern, i, n, h)
        if causal:
            expected = expected & torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.equal(masks[i], expected)
    # a query sees keys only when its own index is selected: row p of branch 1, head 1 in "all" mode
    if head_mode == "all" and not causal:
        assert masks[1, 1, 1].sum() == 4 and masks[1, 1, 0].sum() == 0


def test_plot_pattern_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "pattern.png"
    fig = plot_pattern((4, 8), (1, 2), 16, 3, "all", True, path=path, max_heads=2)
    assert len(fig.axes) == 2 * 3  # 2 heads x (2 branches + union)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli = tmp_path / "cli.png"
    main(
        [
            "--segment-lengths",
            "4",
            "--dilation-rates",
            "2",
            "--seq-len",
            "8",
            "--num-heads",
            "2",
            "--output",
            str(cli),
        ]
    )
    assert cli.stat().st_size > 0
