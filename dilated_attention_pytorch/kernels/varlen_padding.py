"""Varlen calls on kernels that have no varlen form: the sequences padded into
batches, one batch per power-of-two length bucket.

Padding goes after a sequence's last row, so a causal query never sees it; for
a call without causality a key bias removes it. Padded queries' results are
dropped (zero gradient). Buckets bound the padding to under 2x the rows and
the calls to about ``log2(max_len)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

#: the shortest bucket: no length-1 problem reaches a kernel (the CPU flash
#: kernel's backward is wrong there, kernels/sdpa.py)
MIN_BUCKET = 2


@dataclasses.dataclass(frozen=True)
class Bucket:
    """``num_seqs`` sequences as a ``(num_seqs, length)`` batch: ``rows`` are
    their rows in the packed tensor and ``slots`` where those go in the
    flattened batch (None: every slot, no padding)."""

    length: int
    num_seqs: int
    rows: Tensor
    slots: Tensor | None

    def batch(self, x: Tensor) -> Tensor:
        """``(num_seqs, heads, length, d)`` of the packed ``(total, heads, d)``; padding is 0."""
        picked = x.index_select(0, self.rows)
        if self.slots is not None:
            flat = picked.new_zeros(self.num_seqs * self.length, *picked.shape[1:])
            picked = flat.index_copy(0, self.slots, picked)
        return picked.unflatten(0, (self.num_seqs, self.length)).transpose(1, 2)

    def put(self, dest: Tensor, batched: Tensor) -> None:
        """Write the real rows of ``(num_seqs, heads, length[, d])`` into ``dest``
        ``(total, heads[, d])``."""
        flat = batched.transpose(1, 2).flatten(0, 1)
        dest.index_copy_(0, self.rows, flat if self.slots is None else flat.index_select(0, self.slots))

    def key_bias(self, dtype: torch.dtype) -> Tensor | None:
        """``(num_seqs, 1, 1, length)``: 0 on real keys, -inf on padding (None: none)."""
        if self.slots is None:
            return None
        bias = torch.full((self.num_seqs * self.length,), -math.inf, dtype=dtype, device=self.rows.device)
        return bias.index_fill(0, self.slots, 0.0).view(self.num_seqs, 1, 1, self.length)


def buckets(lengths: list[int], device: torch.device) -> list[Bucket]:
    """The sequences of ``lengths`` (packed one after another) by power-of-two bucket."""
    by_length: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for n in lengths:
        if n > 0:
            by_length.setdefault(max(MIN_BUCKET, 1 << (n - 1).bit_length()), []).append((start, n))
        start += n
    out = []
    for length, members in sorted(by_length.items()):
        rows, slots = padded_rows(members, length, device)
        out.append(Bucket(length, len(members), rows, slots))
    return out


def padded_rows(
    members: list[tuple[int, int]], length: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """``(rows, slots)`` of sequences ``(start, count)`` padded to ``length`` rows
    each: their packed rows in order, and where those go in the flattened
    ``(len(members)·length)`` batch (None: every slot, no padding)."""
    starts = torch.tensor([s for s, _ in members], dtype=torch.int64)
    counts = torch.tensor([n for _, n in members], dtype=torch.int64)
    offsets = torch.arange(length, dtype=torch.int64)
    valid = (offsets[None, :] < counts[:, None]).flatten()
    rows = (starts[:, None] + offsets[None, :]).flatten()[valid]
    slots = None if bool(valid.all()) else torch.nonzero(valid).flatten().to(device)
    return rows.to(device), slots
