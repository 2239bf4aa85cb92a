"""One query at the end of the keys (``seqlen_q == 1 < seqlen_k``: a decoding
step over a full key cache), computed directly.

The query at position ``p = seqlen_k - 1`` reads, in branch ``i``, only keys of
its own segment ``[s·w_i, p]`` whose index in the segment has the query's
residue ``o = (p - s·w_i) mod r_i``, and only the heads with offset ``o`` take
part: one strided view of at most ``ceil(w_i / r_i)`` keys per branch. The
query window of :mod:`.window` would instead run every query row of the last
``lcm(segment_lengths)`` positions and drop all but one. Every key of the
sequence is at or before ``p``, so causal and non-causal calls are the same.

The branches' keys are put side by side and attended in one softmax, each head
masked to the branches it takes part in: the lse merge of branches over
disjoint key sets is one softmax over their union, a key counted once per
branch that selects it (docs/semantics.md, "Merge"). One call per layer, not
one per branch, is what a decoding step's launch count needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._cache import BoundedCache
from .._checks import accumulation_dtype
from ..kernels.math import attention_lse
from ..pattern import DilatedPattern

#: per (pattern, heads, branch, residue, device): the heads' bias column, 0 or -inf
_COLUMNS: BoundedCache[Tensor] = BoundedCache(256)


def _column(pattern: DilatedPattern, heads: int, branch: int, residue: int, device: torch.device) -> Tensor:
    def build() -> Tensor:
        offsets = pattern.branch_offsets(branch, heads)
        taking = torch.tensor([offset == residue for offset in offsets])
        return torch.where(taking, 0.0, -math.inf).to(device)

    return _COLUMNS.get((pattern, heads, branch, residue, device), build)


def last_query_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Dilated attention of the last position's query over every key before it.

    Args:
        query: ``(batch, 1, heads, head_dim)``, any strides.
        key: ``(batch, seqlen_k, kv_heads, head_dim)``.
        value: ``(batch, seqlen_k, kv_heads, head_dim_v)``.
        key_bias: ``(batch, seqlen_k)`` additive bias, or None.
        attn_bias: ``(batch | 1, heads | 1, 1, seqlen_k)`` additive bias, or None.
        pattern: the layer's pattern.
        scale: the softmax scale.

    Returns:
        ``(batch, 1, heads, head_dim_v)`` in the query's dtype, and the lse
        ``(batch, 1, heads)`` (float32, float64 for float64 inputs; -inf where no key).
    """
    h, n = query.shape[2], key.shape[1]
    p = n - 1
    compute = accumulation_dtype(query.dtype)
    rows, columns = [], []
    for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
        start = p // w * w
        residue = (p - start) % r
        index = slice(start + residue, n, r)
        rows.append(index)
        columns.append(_column(pattern, h, i, residue, query.device).expand(len(range(n)[index]), h))
    # (b, kv_heads, keys, d): every branch's keys, branch after branch
    k = torch.cat([key[:, index] for index in rows], 1).transpose(1, 2).to(compute)
    v = torch.cat([value[:, index] for index in rows], 1).transpose(1, 2).to(compute)
    bias = torch.cat(columns).T[None, :, None]  # (1, h, 1, keys)
    if key_bias is not None:
        bias = bias + torch.cat([key_bias[:, index] for index in rows], 1)[:, None, None]
    if attn_bias is not None:
        bias = bias + torch.cat([attn_bias[..., index] for index in rows], -1)
    q = query.transpose(1, 2).to(compute)  # (b, h, 1, d)
    out, lse = attention_lse(q, k, v, bias.to(compute), False, scale)
    return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2)
