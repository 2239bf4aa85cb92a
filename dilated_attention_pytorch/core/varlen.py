"""Packed documents (variable-length sequences, the flash-attn varlen layout):
``(total_tokens, heads, head_dim)`` inputs and ``cu_seqlens`` offsets, each
document its own sequence.

Documents are grouped by their length rounded up to a power of two; each group
runs as one batch of that length (one call of the dense-batch path, so every
method and backend applies), copied in and out by index. Padding goes after a
document's last token, where it changes nothing a real query computes: segments
still start at the document's first token, and a position's index in its
segment is unchanged. Causal queries never see the padded keys (they come
after every real query); without causality a key padding mask removes them.
The padded queries' results are dropped (zero gradient). So the FLOPs are at
most those of the padded lengths (under 2x the documents'), there is no
``(total, total)`` mask, and a group of a thousand tiny documents is one call.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from .._checks import check_int


@dataclasses.dataclass(frozen=True)
class DocumentGroup:
    """Documents padded to ``length``: ``rows`` (``(docs·length,)`` int64) are their
    tokens' indices in the packed tensor and ``valid`` marks real (not padding) rows."""

    length: int
    rows: Tensor
    valid: Tensor
    num_docs: int

    def gather(self, x: Tensor) -> Tensor:
        """``(docs, length, ...)`` of a packed ``(total, ...)`` tensor; padding rows are 0."""
        picked = x.index_select(0, self.rows) * self.valid.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return picked.view(self.num_docs, self.length, *x.shape[1:])

    def key_padding_mask(self) -> Tensor:
        """``(docs, length)`` bool, True where a row is padding."""
        return ~self.valid.view(self.num_docs, self.length)


def check_cu_seqlens(
    cu_seqlens: Tensor, total: int, max_seqlen: int | None, device: torch.device
) -> list[int]:
    """The document boundaries of ``cu_seqlens`` as ints, after every rule is checked."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be int32 or int64 (the flash-attn convention), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be 1-D (num_docs + 1,) with at least one document, got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the inputs' device {device}, got {cu_seqlens.device}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            "cu_seqlens must be non-decreasing (document i is rows cu_seqlens[i] .. cu_seqlens[i + 1])"
        )
    if bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens[-1] must equal total_tokens = {total} (query.shape[0]), got {bounds[-1]}"
        )
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    if max_seqlen is not None:
        check_int("max_seqlen", max_seqlen, 0)
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen must be >= the longest document ({longest}), got {max_seqlen}")
    return bounds


def cu_seqlens_from_document_ids(document_ids: Tensor) -> tuple[Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of per-token document ids ``(total_tokens,)``:
    each document one contiguous run of equal ids (a data pipeline's packing)."""
    if (
        not isinstance(document_ids, Tensor)
        or document_ids.dim() != 1
        or document_ids.dtype.is_floating_point
    ):
        raise ValueError("document_ids must be a 1-D integer tensor (total_tokens,)")
    if document_ids.numel() == 0:
        raise ValueError("document_ids must not be empty")
    change = torch.nonzero(document_ids[1:] != document_ids[:-1]).flatten() + 1
    starts = torch.cat([change.new_zeros(1), change, change.new_full((1,), document_ids.numel())])
    ids = document_ids[starts[:-1]]
    if ids.unique().numel() != ids.numel():
        raise ValueError(
            "document_ids must keep each document contiguous: an id appears in two separate runs"
        )
    cu_seqlens = starts.to(torch.int32)
    return cu_seqlens, int((starts[1:] - starts[:-1]).max())


def document_groups(bounds: list[int], device: torch.device) -> list[DocumentGroup]:
    """Documents grouped by their length rounded up to a power of two."""
    by_length: dict[int, list[tuple[int, int]]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(1 << (end - start - 1).bit_length(), []).append((start, end))
    groups = []
    for length, docs in sorted(by_length.items()):
        starts = torch.tensor([s for s, _ in docs], dtype=torch.int64)
        counts = torch.tensor([e - s for s, e in docs], dtype=torch.int64)
        offsets = torch.arange(length, dtype=torch.int64)
        valid = offsets[None, :] < counts[:, None]
        rows = torch.where(valid, starts[:, None] + offsets[None, :], 0)
        groups.append(DocumentGroup(length, rows.flatten().to(device), valid.flatten().to(device), len(docs)))
    return groups


def scatter_back(outputs: list[tuple[DocumentGroup, Tensor]], like: Tensor) -> Tensor:
    """The packed ``(total, heads, head_dim)`` output from each group's
    ``(docs, length, heads, head_dim)`` result (real rows only)."""
    out = like.new_zeros(like.shape[0], *outputs[0][1].shape[2:]) if outputs else like.new_zeros(like.shape)
    for group, result in outputs:
        keep = torch.nonzero(group.valid).flatten()
        out = out.index_copy(0, group.rows[keep], result.flatten(0, 1).index_select(0, keep))
    return out
