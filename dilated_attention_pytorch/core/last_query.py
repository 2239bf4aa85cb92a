"""One query at the end of the keys (``seqlen_q == 1 < seqlen_k``: a decoding
step over a full key cache), computed directly.

The query at position ``p = seqlen_k - 1`` reads, in branch ``i``, only keys of
its own segment ``[s·w_i, p]`` whose index in the segment has the query's
residue ``o = (p - s·w_i) mod r_i``, and only the heads with offset ``o`` take
part: one strided view of at most ``ceil(w_i / r_i)`` keys per branch. The
query window of :mod:`.window` would instead run every query row of the last
``lcm(segment_lengths)`` positions and drop all but one. Every key of the
sequence is at or before ``p``, so causal and non-causal calls are the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from ..kernels.math import attention_lse
from ..pattern import DilatedPattern, kv_head
from .merge import merge_by_lse


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
    b, _, h, _ = query.shape
    n, kv_heads = key.shape[1], key.shape[2]
    p = n - 1
    compute = accumulation_dtype(query.dtype)
    q = query.transpose(1, 2).to(compute)  # (b, h, 1, d)
    outs, lses = [], []
    for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
        out = q.new_zeros(b, h, 1, value.shape[-1])
        lse = q.new_full((b, h, 1), -math.inf)
        start = p // w * w
        offset = (p - start) % r
        for branch_offset, heads in pattern.branch_heads(i, h):
            if branch_offset != offset:
                continue
            rows = slice(start + offset, n, r)
            picked = slice(heads.start, heads.stop, heads.step)
            kv = torch.tensor([kv_head(j, h, kv_heads) for j in heads], device=key.device)
            # (b, heads, m, d): each query head's key/value head, m <= ceil(w / r) rows
            k = key[:, rows].index_select(2, kv).transpose(1, 2)
            v = value[:, rows].index_select(2, kv).transpose(1, 2)
            bias = None
            if key_bias is not None:
                bias = key_bias[:, None, None, rows]
            if attn_bias is not None:
                extra = attn_bias[..., rows].expand(b, h, 1, -1)[:, picked]
                bias = extra if bias is None else bias + extra
            out[:, picked], lse[:, picked] = attention_lse(
                q[:, picked], k.to(compute), v.to(compute), bias, False, scale
            )
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = merge_by_lse(outs, lses)
    return merged.transpose(1, 2).to(query.dtype), merged_lse.transpose(1, 2)
