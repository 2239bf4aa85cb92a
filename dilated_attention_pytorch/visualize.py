"""Pictures of a dilated pattern: which keys each query sees, per head and branch.

``python -m dilated_attention_pytorch.visualize --segment-lengths 4 8 16
--dilation-rates 1 2 4 --seq-len 32 --num-heads 4 --output pattern.png``

Needs matplotlib (``pip install "dilated_attention_pytorch[viz]"``); the masks
themselves (:func:`pattern_masks`) need only torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .pattern import DilatedPattern, HeadMode
from .reference import branch_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: one colour per branch (cycled), white = not seen
BRANCH_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def pattern_masks(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    seq_len: int,
    num_heads: int,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
) -> Tensor:
    """Bool ``(branches, heads, seq, seq)``: True where branch ``i`` lets query
    ``p`` (row) of head ``j`` see key ``k`` (column)."""
    pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)
    masks = torch.stack([branch_mask(pattern, i, seq_len, num_heads) for i in range(pattern.num_branches)])
    if is_causal:
        masks &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return masks


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plotting needs matplotlib: pip install "dilated_attention_pytorch[viz]" (or matplotlib)'
        ) from error
    return plt


def plot_pattern(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    seq_len: int,
    num_heads: int,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
    path: str | Path | None = None,
    max_heads: int = 8,
) -> Figure:
    """One row per head (the first ``max_heads``), one column per branch and a
    last column with all branches together, each an image of queries (rows) by
    keys (columns) coloured by the branch that lets the query see the key (a
    darker shade where several do). Saved as PNG to ``path`` if given."""
    from matplotlib.colors import to_rgb

    plt = _pyplot()
    masks = pattern_masks(segment_lengths, dilation_rates, seq_len, num_heads, head_mode, is_causal)
    k = masks.shape[0]
    heads = min(num_heads, max_heads)
    fig, axes = plt.subplots(
        heads, k + 1, figsize=(1.9 * (k + 1), 1.9 * heads + 0.6), squeeze=False, constrained_layout=True
    )
    colours = torch.tensor([to_rgb(BRANCH_COLOURS[i % len(BRANCH_COLOURS)]) for i in range(k)])
    for j in range(heads):
        union = torch.ones(seq_len, seq_len, 3)
        count = masks[:, j].sum(0)
        for i in range(k):
            image = torch.ones(seq_len, seq_len, 3)
            image[masks[i, j]] = colours[i]
            union[masks[i, j]] = colours[i]
            _show(axes[j][i], image, f"head {j}, branch {i}" if j == 0 else f"head {j}")
        union[count > 1] *= 0.6  # a key seen through several branches counts once per branch
        _show(axes[j][k], union, "all branches" if j == 0 else f"head {j}")
    for i in range(k):
        axes[0][i].set_title(
            f"branch {i}: w={segment_lengths[i]}, r={dilation_rates[i]}",
            fontsize=8,
            color=BRANCH_COLOURS[i % 8],
        )
    fig.suptitle(
        f"head_mode={head_mode!r}, seq_len={seq_len}, {num_heads} heads" + (", causal" if is_causal else ""),
        fontsize=10,
    )
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _show(ax: Any, image: Tensor, title: str) -> None:
    ax.imshow(image.numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segment-lengths", type=int, nargs="+", required=True)
    parser.add_argument("--dilation-rates", type=int, nargs="+", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--num-heads", type=int, required=True)
    parser.add_argument("--head-mode", choices=("grouped", "all"), default="grouped")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--max-heads", type=int, default=8)
    parser.add_argument("--output", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    plot_pattern(
        args.segment_lengths,
        args.dilation_rates,
        args.seq_len,
        args.num_heads,
        args.head_mode,
        args.causal,
        path=args.output,
        max_heads=args.max_heads,
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()


__all__ = ["pattern_masks", "plot_pattern"]
