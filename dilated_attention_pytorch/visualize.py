"""Pictures of a dilated pattern: which keys each query sees, per head and branch.

``python -m dilated_attention_pytorch.visualize`` draws the pattern of the
docs' front page (segments 8, 16, 32, dilations 1, 2, 4, four heads, "all"
head mode, causal) into ``pattern.png``; ``--help`` lists the options.

Needs matplotlib (``pip install "torch-dilated-attention[viz]"``); the masks
themselves (:func:`pattern_masks`) need only torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .pattern import DilatedPattern, HeadMode
from .reference import branch_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: longest sequence drawn: the masks are (heads, seq, seq) per branch
MAX_SEQ_LEN = 8192
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
    return torch.stack(list(_branch_masks(pattern, seq_len, num_heads, num_heads, is_causal)))


def _branch_masks(
    pattern: DilatedPattern, seq_len: int, num_heads: int, heads: int, is_causal: bool
) -> Iterator[Tensor]:
    """Per branch, bool ``(heads, seq, seq)`` of the first ``heads`` heads, one branch at a time."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril() if is_causal else None
    for i in range(pattern.num_branches):
        mask = branch_mask(pattern, i, seq_len, num_heads)[:heads]
        yield mask & causal if causal is not None else mask


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plotting needs matplotlib: pip install "torch-dilated-attention[viz]" (or matplotlib)'
        ) from error
    return plt


def pool_mask(mask: Tensor, size: int) -> Tensor:
    """``(..., n, n)`` bool -> ``(..., m, m)`` with ``m = min(n, size)``: a pixel is
    True where any pair in its block is (max-pooling: thin diagonals stay visible)."""
    n = mask.shape[-1]
    if n <= size:
        return mask
    factor = -(-n // size)
    m = -(-n // factor)
    pad = m * factor - n
    x = torch.nn.functional.pad(mask.float(), (0, pad, 0, pad))
    x = x.reshape(*mask.shape[:-2], m, factor, m, factor)
    return x.amax(dim=(-3, -1)) > 0


def plot_pattern(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    seq_len: int,
    num_heads: int,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
    path: str | Path | None = None,
    max_heads: int = 8,
    max_pixels: int = 256,
) -> Figure:
    """One row per head (the first ``max_heads``), one column per branch and a
    last column with all branches together, each an image of queries (rows) by
    keys (columns) coloured by the branch that lets the query see the key (a
    darker shade where several do). Sequences longer than ``max_pixels`` are
    max-pooled to that many pixels a side; at most ``MAX_SEQ_LEN`` positions.
    Saved as PNG to ``path`` if given."""
    if seq_len > MAX_SEQ_LEN:
        raise ValueError(
            f"seq_len must be at most {MAX_SEQ_LEN} to draw (the masks are seq_len x seq_len per head and "
            f"branch), got {seq_len}; the pattern repeats every max(segment_lengths) positions, so a "
            "shorter sequence shows it"
        )
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    plt = _pyplot()  # first: the friendly hint when matplotlib is missing
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)
    k = pattern.num_branches
    heads = min(num_heads, max_heads)
    # pooled as they come: never more than one branch's (heads, seq, seq) masks alive
    masks = torch.stack(
        [pool_mask(m, max_pixels) for m in _branch_masks(pattern, seq_len, num_heads, heads, is_causal)]
    )
    m = masks.shape[-1]
    scale = seq_len / m
    fig, axes = plt.subplots(
        heads, k + 1, figsize=(2.2 * (k + 1), 2.2 * heads + 1.2), squeeze=False, constrained_layout=True
    )
    colours = torch.tensor([to_rgb(BRANCH_COLOURS[i % len(BRANCH_COLOURS)]) for i in range(k)])
    for j in range(heads):
        union = torch.ones(m, m, 3)
        count = masks[:, j].sum(0)
        for i in range(k):
            image = torch.ones(m, m, 3)
            image[masks[i, j]] = colours[i]
            union[masks[i, j]] = colours[i]
            _show(axes[j][i], image, f"head {j}", seq_len)
        union[count > 1] *= 0.6  # a key seen through several branches counts once per branch
        _show(axes[j][k], union, f"head {j}, all branches", seq_len)
    for i in range(k):
        axes[0][i].set_title(
            f"head 0, branch {i}: w={segment_lengths[i]}, r={dilation_rates[i]}",
            fontsize=8,
            color=BRANCH_COLOURS[i % len(BRANCH_COLOURS)],
        )
    handles = [
        Patch(color=BRANCH_COLOURS[i % len(BRANCH_COLOURS)], label=f"branch {i} (w={w}, r={r})")
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates))
    ]
    handles.append(Patch(color="0.35", label="seen by several branches (darker)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        f"which keys (columns) each query (rows) sees\nhead_mode={head_mode!r}, seq_len={seq_len}, "
        f"{num_heads} heads" + (", causal" if is_causal else "")
        + (f" (max-pooled, {scale:.3g} positions per pixel)" if m < seq_len else ""),
        fontsize=10,
    )  # fmt: skip
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _show(ax: Any, image: Tensor, title: str, seq_len: int) -> None:
    ax.imshow(image.numpy(), interpolation="nearest", extent=(0, seq_len, seq_len, 0))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("key position", fontsize=7)
    ax.set_ylabel("query position", fontsize=7)
    ax.tick_params(labelsize=6)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dilated_attention_pytorch.visualize``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--segment-lengths", type=int, nargs="+", default=[8, 16, 32], help="segment length of each branch"
    )
    parser.add_argument(
        "--dilation-rates", type=int, nargs="+", default=[1, 2, 4], help="dilation rate of each branch"
    )
    parser.add_argument("--seq-len", type=int, default=32, help=f"positions to draw (at most {MAX_SEQ_LEN})")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads of the layer")
    parser.add_argument(
        "--head-mode",
        choices=("grouped", "all"),
        default="all",
        help="grouped: one group of heads per branch; all: every head in every branch, with offsets",
    )
    parser.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the causal pattern (queries see keys at or before them)",
    )
    parser.add_argument("--max-heads", type=int, default=8, help="draw at most this many heads (rows)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=256,
        help="longer sequences are max-pooled to this many pixels a side",
    )
    parser.add_argument("--output", type=Path, default=Path("pattern.png"), help="PNG file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    plot_pattern(
        args.segment_lengths,
        args.dilation_rates,
        args.seq_len,
        args.num_heads,
        args.head_mode,
        args.causal,
        path=args.output,
        max_heads=args.max_heads,
        max_pixels=args.max_pixels,
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()


__all__ = ["MAX_SEQ_LEN", "pattern_masks", "plot_pattern", "pool_mask"]
