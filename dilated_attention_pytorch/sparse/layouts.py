"""Block layouts: which key blocks each query block may see.

A layout is a bool tensor over blocks of ``block_size`` consecutive positions,
``(n_blocks, n_blocks)``, ``(heads, n_blocks, n_blocks)`` or
``(batch, heads, n_blocks, n_blocks)``; entry ``[Q, K]`` True lets queries of
block ``Q`` see keys of block ``K`` (on top of the dilated pattern and masks).

``sparsity`` is the fraction of blocks skipped: of all ``n_blocks²`` blocks, or,
when causal, of the ``n_blocks (n_blocks + 1) / 2`` blocks on or below the
diagonal. The patterns hit it as closely as their shape allows
(:func:`layout_sparsity` reports the actual value).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_int

LAYOUT_PATTERNS: tuple[str, ...] = ("local_window", "dilated_sparse", "global_local", "random", "hilbert")

#: A user pattern: ``fn(num_blocks) -> bool (n_blocks, n_blocks) or (heads, n_blocks, n_blocks)``.
LayoutFn = Callable[[int], Tensor]


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")


def check_block_size(block_size: int) -> None:
    check_int("block_size", block_size)


def _causal_candidates(n: int, device: torch.device | None) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _budget(n: int, sparsity: float, causal: bool) -> float:
    total = n * (n + 1) / 2 if causal else n * n
    return (1.0 - sparsity) * total


def layout_sparsity(layout: Tensor, causal: bool = False) -> float:
    """Fraction of blocks a layout skips (of the causal half when ``causal``)."""
    n = layout.shape[-1]
    kept = layout & _causal_candidates(n, layout.device) if causal else layout
    total = n * (n + 1) / 2 if causal else n * n
    return 1.0 - kept.sum().item() / (total * (layout.numel() // (n * n)))


def _with_diagonal(layout: Tensor, causal: bool) -> Tensor:
    n = layout.shape[-1]
    layout = layout | torch.eye(n, dtype=torch.bool, device=layout.device)
    return layout & _causal_candidates(n, layout.device) if causal else layout


def _fit(build: Callable[[int], Tensor], lo: int, hi: int, budget: float, causal: bool) -> Tensor:
    """The layout ``build(p)`` (kept count non-decreasing in ``p``) closest to ``budget``."""

    def kept(p: int) -> int:
        layout = build(p)
        n = layout.shape[-1]
        return int((layout & _causal_candidates(n, layout.device)).sum() if causal else layout.sum())

    while lo < hi:  # smallest p with kept(p) >= budget
        mid = (lo + hi) // 2
        if kept(mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    best = min({max(lo - 1, 0), lo}, key=lambda p: abs(kept(p) - budget))
    return build(best)


def _distance(n: int, device: torch.device | None) -> Tensor:
    """``Q - K`` for every block pair."""
    idx = torch.arange(n, device=device)
    return idx[:, None] - idx[None, :]


def local_window(n: int, sparsity: float, causal: bool = False, device: torch.device | None = None) -> Tensor:
    """Each query block sees the key blocks nearest to it (the ones before it when causal)."""
    dist = _distance(n, device)

    def build(width: int) -> Tensor:
        if causal:
            return (dist >= 0) & (dist <= width)
        return dist.abs() <= width

    return _fit(build, 0, n, _budget(n, sparsity, causal), causal)


def dilated_sparse(
    n: int, sparsity: float, causal: bool = False, device: torch.device | None = None
) -> Tensor:
    """Key blocks at distances that are multiples of a stride (≈ ``1 / (1 - sparsity)``),
    the diagonal included: every query block reaches the whole sequence sparsely."""
    dist = _distance(n, device)
    base = (dist >= 0) if causal else torch.ones(n, n, dtype=torch.bool, device=device)

    # a larger stride keeps fewer blocks, so search over n - stride
    def build(p: int) -> Tensor:
        return base & (dist.remainder(n - p) == 0)

    return _fit(build, 0, n - 1, _budget(n, sparsity, causal), causal)


def global_local(
    n: int,
    sparsity: float,
    causal: bool = False,
    device: torch.device | None = None,
    global_blocks: int | None = None,
) -> Tensor:
    """A few global blocks (the first ``global_blocks``, default about an eighth of
    the budget) that every query sees and that see everything, plus a local window."""
    if global_blocks is None:
        global_blocks = max(1, math.ceil((1.0 - sparsity) * n / 8))
    g = min(global_blocks, n)
    idx = torch.arange(n, device=device)
    glob = (idx[None, :] < g) | (idx[:, None] < g)
    dist = _distance(n, device)

    def build(width: int) -> Tensor:
        near = ((dist >= 0) & (dist <= width)) if causal else dist.abs() <= width
        return near | glob

    return _fit(build, 0, n, _budget(n, sparsity, causal), causal)


def random_blocks(
    n: int, sparsity: float, causal: bool = False, device: torch.device | None = None, seed: int = 0
) -> Tensor:
    """Each block kept independently with the probability that meets the budget,
    the diagonal always; reproducible from ``seed`` (drawn on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(n, n, generator=generator)
    off_diagonal = n * (n - 1) / 2 if causal else n * (n - 1)
    p = (_budget(n, sparsity, causal) - n) / off_diagonal if off_diagonal else 0.0
    layout = (draw < p).to(device)
    return _with_diagonal(layout, causal)


def make_layout(
    pattern: str | LayoutFn,
    n: int,
    sparsity: float,
    *,
    causal: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """The bool layout of a named pattern (or a user callable) on ``n`` blocks,
    with the diagonal block always allowed (and nothing above it when causal)."""
    check_sparsity(sparsity)
    if callable(pattern):
        layout = pattern(n)
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool or layout.shape[-2:] != (n, n):
            got = (tuple(layout.shape), layout.dtype) if isinstance(layout, Tensor) else type(layout).__name__
            raise ValueError(
                f"a pattern callable must return a bool tensor (n_blocks, n_blocks) or "
                f"(heads, n_blocks, n_blocks) with n_blocks={n}, got {got}"
            )
        if layout.dim() not in (2, 3):
            raise ValueError(f"a pattern callable must return a 2-D or 3-D layout, got {layout.dim()}-D")
        return _with_diagonal(layout.to(device), causal)
    if pattern == "local_window" or pattern == "hilbert":
        layout = local_window(n, sparsity, causal, device)
    elif pattern == "dilated_sparse":
        layout = dilated_sparse(n, sparsity, causal, device)
    elif pattern == "global_local":
        layout = global_local(n, sparsity, causal, device)
    elif pattern == "random":
        layout = random_blocks(n, sparsity, causal, device, seed)
    else:
        raise ValueError(f"pattern must be one of {LAYOUT_PATTERNS} or a callable, got {pattern!r}")
    return _with_diagonal(layout, causal)


def expand_layout(layout: Tensor, block_size: int, seq_len: int) -> Tensor:
    """Block layout -> position mask ``(..., seq, seq)``, True = allowed."""
    full = layout.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    return full[..., :seq_len, :seq_len]


def hilbert_order(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Row-major indices ``y * width + x`` of a ``height × width`` grid in the
    order of a Hilbert curve over the enclosing power-of-two square (cells
    outside the grid skipped). ``order[i]`` is the grid index visited i-th."""
    for name, v in (("height", height), ("width", width)):
        check_int(f"spatial_shape {name}", v)
    side = 1 << max(height - 1, width - 1, 1).bit_length()
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    x, y = x.flatten().clone(), y.flatten().clone()
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        # rotate the quadrant so the curve stays continuous
        flip = ~ry & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return torch.argsort(d).to(device)
