"""Pattern pictures: the masks are the reference's, and the PNG is written."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.reference import branch_mask
from dilated_attention_pytorch.visualize import MAX_SEQ_LEN, main, pattern_masks, plot_pattern, pool_mask


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


def test_bare_command_draws_the_front_page_pattern(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    main([])
    assert (tmp_path / "pattern.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_option_has_help() -> None:
    from dilated_attention_pytorch.visualize import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings]
    assert len(actions) >= 10 and all(a.help for a in actions)


def test_pooling_keeps_every_seen_pair() -> None:
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[3, 7] = True  # a lone pair must survive downsampling (nearest sampling would drop it)
    pooled = pool_mask(mask, 4)
    assert pooled.shape == (4, 4) and pooled.sum() == 1 and pooled[1, 2]
    assert pool_mask(mask, 16) is mask


def test_long_sequences_are_refused_before_any_mask_is_built() -> None:
    with pytest.raises(ValueError, match="seq_len must be at most"):
        plot_pattern((4,), (1,), MAX_SEQ_LEN + 1, 2)


def test_axes_are_labelled_and_the_branches_have_a_legend() -> None:
    pytest.importorskip("matplotlib")
    fig = plot_pattern((4, 8), (1, 2), 16, 2, "all", False, max_heads=2)
    assert all(ax.get_xlabel() == "key position" and ax.get_ylabel() == "query position" for ax in fig.axes)
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "branch 0 (w=4, r=1)" in texts and "branch 1 (w=8, r=2)" in texts


def test_missing_matplotlib_gets_the_extra_hint(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"torch-dilated-attention\[viz\]"):
        plot_pattern((4,), (1,), 8, 1)
