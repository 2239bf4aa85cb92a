"""The function of docs/semantics.md, written as plainly as possible.

Dense ``(n, n)`` masks, no tricks: this is the truth every implementation is
tested against, and the exact attention weights ``need_weights=True`` returns.
Memory is O(batch · heads · n²); use it on short sequences only: calls whose
estimate (:func:`dense_bytes`) exceeds ``max_bytes`` are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .pattern import DilatedPattern, HeadMode

#: default limit of :func:`dilated_attention_reference`'s estimated memory
DEFAULT_MAX_BYTES = 4 * 2**30


def branch_mask(pattern: DilatedPattern, branch: int, seq_len: int, num_heads: int) -> Tensor:
    """Bool ``(heads, seq, seq)``: True where branch ``branch`` lets query ``p``
    of head ``j`` see key ``k`` (same segment, both indices ``≡ offset (mod r)``)."""
    r = pattern.dilation_rates[branch]
    pos = torch.arange(seq_len)
    segment = pos // pattern.segment_lengths[branch]
    index_in_segment = pos % pattern.segment_lengths[branch]
    same_segment = segment[:, None] == segment[None, :]
    # -1 for a head that does not use the branch: no index matches it
    offsets = [pattern.head_offset(branch, head, num_heads) for head in range(num_heads)]
    offset = torch.tensor([-1 if o is None else o for o in offsets])
    selected = (index_in_segment % r)[None, :] == offset[:, None]  # (heads, seq)
    return same_segment[None] & selected[:, :, None] & selected[:, None, :]


def dense_bytes(batch: int, seq_len: int, num_heads: int, dtype: torch.dtype, branches: int = 1) -> int:
    """Estimated peak memory of :func:`dilated_attention_reference`: about eight
    ``(batch, heads, seq, seq)`` tensors of ``dtype`` (scores, counts, weights and
    their temporaries; six measured without autograd) plus a bool mask per branch."""
    pairs = batch * num_heads * seq_len * seq_len
    return pairs * (8 * dtype.itemsize + branches)


def _logsumexp_or_neg_inf(x: Tensor, dim: int) -> Tensor:
    """logsumexp that gives -inf (and a zero, not NaN, gradient) for all -inf slices."""
    any_finite = torch.isfinite(x).any(dim, keepdim=True)
    lse = torch.logsumexp(torch.where(any_finite, x, 0.0), dim, keepdim=True)
    return torch.where(any_finite, lse, -math.inf).squeeze(dim)


def dilated_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    softmax_scale: float | None = None,
    return_weights: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention (docs/semantics.md), computed densely.

    Args:
        query: ``(batch, seqlen_q, heads, head_dim)``: the last ``seqlen_q``
            positions of the key sequence (``seqlen_q <= seqlen_k``).
        key: ``(batch, seqlen_k, kv_heads, head_dim)``, ``heads % kv_heads == 0``:
            query head ``j`` reads key/value head ``j // (heads // kv_heads)``.
        value: ``(batch, seqlen_k, kv_heads, head_dim_v)``.
        key_padding_mask: ``(batch, seqlen_k)``, bool (True = ignore the key) or
            float (added to the scores).
        attn_mask: broadcastable to ``(batch, heads, seqlen_q, seqlen_k)``, bool
            (True = not allowed) or float (added).
        max_bytes: refuse calls whose estimated memory (:func:`dense_bytes`) is
            larger (None: no limit).

    Returns:
        The output ``(batch, seqlen_q, heads, head_dim_v)`` and, with
        ``return_weights``, the weights ``(batch, heads, seqlen_q, seqlen_k)``
        with ``output = weights @ value`` per head.
    """
    pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)
    b, n_q, h, _ = query.shape
    n, kv_heads = key.shape[1], key.shape[2]
    if h % kv_heads or n_q > n:
        raise ValueError(
            f"the reference takes heads % kv_heads == 0 and seqlen_q <= seqlen_k, got {h} query heads, "
            f"{kv_heads} key heads, seqlen_q {n_q}, seqlen_k {n}"
        )
    # grouped-query attention is multi-head attention with each key/value head shared
    key, value = (x.repeat_interleave(h // kv_heads, dim=2) for x in (key, value))
    # queries at the end of the keys: the full-length function's last rows
    query = torch.cat([query.new_zeros(b, n - n_q, h, query.shape[3]), query], 1)
    if attn_mask is not None and attn_mask.shape[-2] != n:
        rows = attn_mask.new_zeros(*attn_mask.shape[:-2], n - attn_mask.shape[-2], n)
        attn_mask = torch.cat([rows, attn_mask], -2)
    d = query.shape[3]
    estimate = dense_bytes(b, n, h, query.dtype, pattern.num_branches)
    if max_bytes is not None and estimate > max_bytes:
        raise ValueError(
            f"the dense reference (need_weights=True) of batch {b}, seq {n}, {h} heads in {query.dtype} "
            f"would take about {estimate / 2**30:.1f} GiB, over max_bytes = {max_bytes / 2**30:.1f} GiB: "
            "it holds (batch, heads, seq, seq) weights. Raise max_bytes (None: no limit) if you mean it"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    device = query.device

    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * scale
    allowed = torch.ones(b, h, n, n, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    for mask in (
        None if key_padding_mask is None else key_padding_mask[:, None, None, :],
        attn_mask,
    ):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            allowed = allowed & ~mask
        elif mask.dtype.is_floating_point:
            scores = scores + mask
        else:  # an integer mask added as scores would be silently wrong
            raise TypeError(f"masks must be bool or floating point here, got {mask.dtype}")
    # a float mask of -inf removes a key just like a bool one
    allowed = allowed & (scores > -math.inf)

    # per-branch log-sum-exp, then the merge of §1: a key selected by c branches
    # carries weight c · exp(s - LSE)
    key_count = torch.zeros(b, h, n, n, dtype=scores.dtype, device=device)
    branch_lse = []
    for i in range(pattern.num_branches):
        keep = allowed & branch_mask(pattern, i, n, h).to(device)
        branch_lse.append(_logsumexp_or_neg_inf(scores.masked_fill(~keep, -math.inf), dim=-1))
        key_count = key_count + keep.to(scores.dtype)
    lse = _logsumexp_or_neg_inf(torch.stack(branch_lse), dim=0)  # (b, h, n)
    # exp only where a key counts: exp(0 - lse) of an unselected key overflows for a
    # very negative lse, and inf * 0 would be NaN
    selected = key_count > 0
    safe_lse = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]
    weights = torch.where(selected, key_count * torch.exp(torch.where(selected, scores - safe_lse, 0.0)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, value)[:, n - n_q :]
    return (out, weights[:, :, n - n_q :]) if return_weights else out
