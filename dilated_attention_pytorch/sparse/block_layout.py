"""A validated block layout and the one way it becomes an additive bias between
query and key positions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._cache import BoundedCache
from .._checks import accumulation_dtype, check_int, fits_4d


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """A block layout of validated shape: ``blocks`` bool ``(batch | 1, heads | 1, nb, nb)``
    over blocks of ``block_size`` positions, True = allowed; ``offset`` is the
    sequence position of local position 0 (a rank's shard start), ``bias_dtype``
    the dtype of the additive biases built from it."""

    blocks: Tensor
    block_size: int
    bias_dtype: torch.dtype
    offset: int = 0
    #: the tensor the caller passed (block masks are cached on it)
    source: Tensor | None = None

    @property
    def cache_owner(self) -> Tensor:
        """The tensor that cached block masks and exchange plans are keyed by."""
        return self.source if self.source is not None else self.blocks


def prepare_layout(
    block_layout: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    seq_len: int | None = None,
) -> BlockLayout:
    """Validate a block layout for inputs of ``shape`` (``seq_len``: of the whole
    sequence, when ``shape`` is a shard) and bring it to 4-D."""
    b, n, h, _ = shape
    n = seq_len if seq_len is not None else n
    check_int("block_size", block_size)
    if not isinstance(block_layout, Tensor):
        raise TypeError(f"block_layout must be a bool Tensor, got {type(block_layout).__name__}")
    if block_layout.dtype != torch.bool:
        raise ValueError(f"block_layout must be a bool tensor (True = allowed), got {block_layout.dtype}")
    nb = -(-n // block_size)
    layout = as_4d(block_layout)
    if block_layout.dim() < 2 or not fits_4d(layout, b, h, nb):
        raise ValueError(
            "block_layout must have shape (n_blocks, n_blocks), (heads | 1, n_blocks, n_blocks) or "
            f"(batch | 1, heads | 1, n_blocks, n_blocks) with n_blocks = ceil({n} / block_size {block_size}) "
            f"= {nb}, heads = {h}, batch = {b}; got {tuple(block_layout.shape)}"
        )
    if layout.device != device:
        raise ValueError(f"block_layout must be on {device}, got {layout.device}")
    return BlockLayout(layout, block_size, accumulation_dtype(dtype), source=block_layout)


def as_4d(layout: Tensor) -> Tensor:
    """``(nb, nb)`` or ``(heads, nb, nb)`` -> ``(1 | batch, 1 | heads, nb, nb)``."""
    while layout.dim() < 4:
        layout = layout[None]
    return layout


def layout_bias(
    blocks: Tensor,
    block_size: int,
    query_positions: Tensor,
    key_positions: Tensor,
    dtype: torch.dtype,
    heads: Sequence[int] | None = None,
) -> Tensor:
    """The layout between queries and keys as an additive bias (0 allowed, -inf not).

    ``blocks``: bool ``(B', H', n_blocks, n_blocks)``; ``query_positions``
    ``(..., m_q)`` and ``key_positions`` ``(..., m_k)`` with broadcastable leading
    dims; ``heads``: the layout heads to take (when it has more than one).
    Returns ``(B', H' | len(heads), ..., m_q, m_k)``.
    """
    if heads is not None and blocks.shape[1] > 1:
        blocks = blocks[:, torch.as_tensor(list(heads), device=blocks.device)]
    q_blocks = (query_positions // block_size)[..., :, None]
    k_blocks = (key_positions // block_size)[..., None, :]
    allowed = blocks[:, :, q_blocks, k_blocks]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)


_ONE_BLOCK: BoundedCache[Tensor] = BoundedCache(16)


def one_block(device: torch.device) -> Tensor:
    """A one-block layout per device: one tensor, so its block masks stay cached."""
    return _ONE_BLOCK.get(device, lambda: torch.ones(1, 1, dtype=torch.bool, device=device))
