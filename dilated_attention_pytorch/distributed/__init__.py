"""Sequence parallelism over ``torch.distributed`` process groups."""

from .ring import ring_dilated_attention

__all__ = ["ring_dilated_attention"]
