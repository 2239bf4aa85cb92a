"""The straightforward dilated attention most public implementations use, kept
here only as a benchmark baseline: per branch, copy-gather q/k/v of every
segment, call SDPA, scatter-add into a zero buffer. Grouped head mode only
(the one those implementations have); it returns the same function as this
library in that mode (no lse merge is needed when each head has one branch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def baseline_dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool = False,
) -> Tensor:
    b, n, h, d = query.shape
    k_branches = len(segment_lengths)
    out = torch.zeros_like(query)
    sizes = [h // k_branches + (1 if i < h % k_branches else 0) for i in range(k_branches)]
    start = 0
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        hs = slice(start, start + sizes[i])
        start += sizes[i]
        if sizes[i] == 0:
            continue
        w = min(w, n)
        offset = i % r
        n_full = (n // w) * w
        for seg_start, seg_len, count in ((0, w, n // w), (n_full, n - n_full, 1)):
            if seg_len <= offset or count == 0:
                continue
            idx = torch.arange(offset, seg_len, r, device=query.device)
            pos = (
                seg_start + torch.arange(count, device=query.device)[:, None] * seg_len + idx[None]
            ).reshape(-1)
            q, kk, v = (
                x[:, pos, hs].reshape(b * count, len(idx), sizes[i], d).transpose(1, 2)
                for x in (query, key, value)
            )
            o = F.scaled_dot_product_attention(q, kk, v, is_causal=is_causal)
            o = o.transpose(1, 2).reshape(b, count * len(idx), sizes[i], d)
            out_part = torch.zeros_like(out)
            out_part[:, pos, hs] = o
            out = out + out_part
    return out
