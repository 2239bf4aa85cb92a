"""Queries at the end of the keys (``seqlen_q < seqlen_k``: decoding, chunked
prefill): the window of whole segments that holds every key those queries see.

The pattern is evaluated at the queries' absolute positions
``seqlen_k - seqlen_q ..``. Every segment boundary of every branch is a
multiple of ``lcm(segment_lengths)``, so from the last such multiple at or
before the first query on, the function restricted to the window equals the
full one: a query sees keys of its own segments only, and those start inside
the window. Queries of the window before the first real one are zero rows
whose outputs are dropped (their gradient is zero, so they add nothing to the
keys' gradients); that costs at most ``lcm(segment_lengths) - 1`` extra rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import overload

import torch
from torch import Tensor

from ..pattern import DilatedPattern


@dataclasses.dataclass(frozen=True)
class QueryWindow:
    """Keys ``[start, seqlen_k)``; ``pad`` zero query rows before the real ones."""

    start: int
    pad: int

    @classmethod
    def of(cls, pattern: DilatedPattern, seqlen_q: int, seqlen_k: int) -> QueryWindow:
        first_query = seqlen_k - seqlen_q
        period = math.lcm(*pattern.segment_lengths)
        start = first_query // period * period
        return cls(start, first_query - start)

    def queries(self, query: Tensor) -> Tensor:
        """``(batch, seqlen_k - start, heads, head_dim)``: ``query`` after ``pad`` zero rows."""
        if self.pad == 0:
            return query
        b, _, h, d = query.shape
        return torch.cat([query.new_zeros(b, self.pad, h, d), query], 1)

    @overload
    def keys(self, x: Tensor) -> Tensor: ...
    @overload
    def keys(self, x: None) -> None: ...
    def keys(self, x: Tensor | None) -> Tensor | None:
        """A ``(batch, seqlen_k, ...)`` tensor (keys, values, key padding) in the window."""
        return None if x is None else x[:, self.start :]

    def attn_mask(self, mask: Tensor | None) -> Tensor | None:
        """A ``(..., seqlen_q, seqlen_k)`` mask as the window's square one; the
        padded rows allow every key (their outputs are dropped)."""
        if mask is None:
            return None
        mask = mask[..., self.start :]
        if self.pad == 0:
            return mask
        rows = mask.new_zeros(*mask.shape[:-2], self.pad, mask.shape[-1])
        return torch.cat([rows, mask], -2)

    def outputs(self, out: Tensor) -> Tensor:
        """The real queries' rows of a ``(batch, window, ...)`` result."""
        return out[:, self.pad :]
