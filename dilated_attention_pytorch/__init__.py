"""LongNet-style dilated attention for PyTorch: exact, interchangeable modules."""

from __future__ import annotations

try:  # written from the git tag when the package is built or installed
    from ._version import __version__
except ImportError:  # a source tree used without installing it
    __version__ = "0.0.0+unknown"

from .core.varlen import cu_seqlens_from_document_ids
from .decoding import DilatedKVCache, LayerKVCache
from .factory import (
    ATTENTION_TYPES,
    AutoChoice,
    create_block_sparse_attention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    explain_auto,
)
from .functional import dilated_attention, dilated_attention_varlen, merge_by_lse
from .modules import DilatedAttention, ImprovedDilatedAttention, RingDilatedAttention
from .multihead import (
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
)
from .pattern import DilatedPattern
from .positions import RotaryEmbedding, XPos
from .reference import dilated_attention_reference
from .sparse.modules import (
    BlockSparseAdaptive,
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
)
from .transformer import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
)

__all__ = [
    "ATTENTION_TYPES",
    "AutoChoice",
    "BlockSparseAdaptive",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "DilatedAttention",
    "DilatedKVCache",
    "DilatedPattern",
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "ImprovedDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "LayerKVCache",
    "LongNet",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "RotaryEmbedding",
    "XPos",
    "__version__",
    "create_block_sparse_attention",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "cu_seqlens_from_document_ids",
    "dilated_attention",
    "dilated_attention_reference",
    "dilated_attention_varlen",
    "explain_auto",
    "merge_by_lse",
]
