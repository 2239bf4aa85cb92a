"""Block-sparse layouts for :class:`BlockSparseRingDilatedAttention` (the
modules live in :mod:`dilated_attention_pytorch.modules`)."""

from .layouts import LAYOUT_PATTERNS, expand_layout, hilbert_order, layout_sparsity, make_layout

__all__ = ["LAYOUT_PATTERNS", "expand_layout", "hilbert_order", "layout_sparsity", "make_layout"]
