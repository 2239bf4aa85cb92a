"""Packed documents (variable-length sequences, the flash-attn varlen layout):
``(total_tokens, heads, head_dim)`` inputs and ``cu_seqlens`` offsets, each
document its own sequence: the checks, and the path for kernels without a
varlen form (with one, :mod:`.packed` runs them).

Documents of one length run as one batch (one call of the dense-batch path,
so every method and backend applies), copied in and out by index. With many
distinct lengths, lengths are rounded up to a power of two instead (fewer
calls); padding goes after a document's last token, where it changes nothing a
real query computes: segments still start at the document's first token, and a
position's index in its segment is unchanged. Causal queries never see the
padded keys (they come after every real query); without causality a key
padding mask removes them. The padded queries' results are dropped (zero
gradient). There is no ``(total, total)`` mask, and a thousand tiny documents
of a few lengths are a few calls.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._cache import TensorMemo
from .._checks import check_int
from ..kernels.varlen_padding import padded_rows


@dataclasses.dataclass(frozen=True)
class DocumentGroup:
    """``num_docs`` documents as a batch of ``length`` rows each: ``tokens`` are
    their rows in the packed tensor (document-major) and ``slots`` where those
    go in the flattened ``(num_docs·length)`` batch (None: every slot, no padding)."""

    length: int
    num_docs: int
    tokens: Tensor
    slots: Tensor | None

    def batch(self, picked: Tensor) -> Tensor:
        """``(num_docs, length, ...)`` from the group's tokens ``(tokens, ...)``; padding is 0."""
        rest = picked.shape[1:]
        if self.slots is not None:
            picked = picked.new_zeros(self.num_docs * self.length, *rest).index_copy(0, self.slots, picked)
        return picked.view(self.num_docs, self.length, *rest)

    def results(self, out: Tensor) -> Tensor:
        """The real rows of a ``(num_docs, length, ...)`` result, in ``tokens`` order."""
        flat = out.flatten(0, 1)
        return flat if self.slots is None else flat.index_select(0, self.slots)

    def key_padding_mask(self) -> Tensor | None:
        """``(num_docs, length)`` bool, True where a row is padding (None: none is)."""
        if self.slots is None:
            return None
        real = torch.zeros(self.num_docs * self.length, dtype=torch.bool, device=self.slots.device)
        return ~real.index_fill(0, self.slots, True).view(self.num_docs, self.length)


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
    longest = _longest(bounds)
    if max_seqlen is not None:
        check_int("max_seqlen", max_seqlen, 0)
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen must be >= the longest document ({longest}), got {max_seqlen}")
    return bounds


_SEEN: TensorMemo[list[int]] = TensorMemo(8)


def host_bounds(cu_seqlens: Tensor, total: int, max_seqlen: int | None, device: torch.device) -> list[int]:
    """:func:`check_cu_seqlens` of a tensor seen before without reading it again
    (:class:`~.._cache.TensorMemo`); the rules are checked again."""
    bounds = _SEEN.lookup(cu_seqlens) if isinstance(cu_seqlens, Tensor) else None
    if bounds is not None and (
        bounds[-1] != total
        or cu_seqlens.device != device
        or (max_seqlen is not None and max_seqlen < _longest(bounds))
    ):
        bounds = None
    if bounds is None:
        bounds = check_cu_seqlens(cu_seqlens, total, max_seqlen, device)
        _SEEN.put(cu_seqlens, bounds)
    return bounds


def _longest(bounds: list[int]) -> int:
    return max(b - a for a, b in itertools.pairwise(bounds))


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


#: at most this many distinct document lengths run unpadded, one group per length
EXACT_GROUPS = 64


def document_groups(bounds: list[int], device: torch.device) -> list[DocumentGroup]:
    """Documents grouped by length: one group per distinct length where there are
    at most :data:`EXACT_GROUPS` of them (no padding), else by length rounded up
    to a power of two (fewer, padded groups: fewer calls for many distinct lengths)."""
    docs = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    exact = len({b - a for a, b in docs}) <= EXACT_GROUPS
    by_length: dict[int, list[tuple[int, int]]] = {}
    for start, end in docs:
        length = end - start if exact else 1 << (end - start - 1).bit_length()
        by_length.setdefault(length, []).append((start, end))
    groups = []
    for length, members in sorted(by_length.items()):
        tokens, slots = padded_rows([(a, b - a) for a, b in members], length, device)
        groups.append(DocumentGroup(length, len(members), tokens, slots))
    return groups


class _Permute(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``, whose backward is the inverse
    gather (``index_select``'s own backward scatter-adds, with atomics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def by_group(x: Tensor, groups: list[DocumentGroup]) -> list[Tensor]:
    """A packed ``(total, ...)`` tensor as each group's ``(num_docs, length, ...)`` batch."""
    order = torch.cat([g.tokens for g in groups])
    picked = _Permute.apply(x, order, torch.argsort(order))
    return [g.batch(part) for g, part in zip(groups, picked.split([len(g.tokens) for g in groups]))]


def scatter_back(outputs: list[tuple[DocumentGroup, Tensor]]) -> Tensor:
    """The packed ``(total, ...)`` output from each group's ``(num_docs, length, ...)``
    result: the real rows of all groups, put back in token order by one gather."""
    tokens = torch.cat([group.tokens for group, _ in outputs])
    rows = torch.cat([group.results(out) for group, out in outputs])
    return _Permute.apply(rows, torch.argsort(tokens), tokens)


#: ``(q, k, v, key_padding_mask) -> out`` of one group's ``(num_docs, length, ...)``
#: batch; the mask ``(num_docs, length)`` is True on padding (None: none)
GroupAttention = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def grouped_by_length(
    query: Tensor, key: Tensor, value: Tensor, bounds: list[int], attention: GroupAttention
) -> Tensor:
    """Packed ``(total, ...)`` documents ``bounds`` run as :func:`document_groups`,
    one ``attention`` call per group, and put back in token order."""
    groups = document_groups(bounds, query.device)
    results = []
    for group, q, k, v in zip(groups, *(by_group(x, groups) for x in (query, key, value))):
        results.append((group, attention(q, k, v, group.key_padding_mask())))
    return scatter_back(results)
