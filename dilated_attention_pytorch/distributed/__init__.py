"""Sequence parallelism over ``torch.distributed`` process groups: the entry point
(:mod:`.attention`), its checks and geometry, and one module per key exchange
(:mod:`.all_gather`, :mod:`.rotation`, :mod:`.sparse_rows`) and :mod:`.balance`."""

from .attention import ring_dilated_attention

__all__ = ["ring_dilated_attention"]
