"""Block-sparse dilated attention end to end: layouts, their validation and bias,
FlexAttention block masks, the FlexAttention path and the modules."""

from .layouts import LAYOUT_PATTERNS, expand_layout, hilbert_order, layout_sparsity, make_layout

__all__ = ["LAYOUT_PATTERNS", "expand_layout", "hilbert_order", "layout_sparsity", "make_layout"]
