"""Attention in plain torch ops: any device and dtype, masks, dropout.

The readable fallback and the kernel of the "standard" implementation. Rows
with no allowed key give output 0 and lse -inf, with finite gradients.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import accumulation_dtype
from .base import ANY_STRIDES, KernelBackend, VarlenForm


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Masked scores and the bool mask of allowed keys, ``(b, h, len, len)``."""
    ct = accumulation_dtype(q.dtype)
    s = torch.matmul(q.to(ct), shared_heads(k, q.shape[1]).to(ct).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(ct)
    allowed = s > -math.inf
    if causal:
        n_q, n_k = s.shape[-2:]
        allowed = allowed & torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).tril()
    return s.masked_fill(~allowed, -math.inf), allowed


def shared_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(b, kv_heads, len, d)`` keys or values as ``num_heads`` heads, each
    shared by ``num_heads // kv_heads`` consecutive query heads (a copy where
    kv_heads < num_heads; under autograd its gradient sums over the sharing heads)."""
    return x if x.shape[1] == num_heads else x.repeat_interleave(num_heads // x.shape[1], dim=1)


def attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Differentiable ``(out, lse)`` of ``(b, h, len, d)`` inputs; lse float32
    (float64 for float64 inputs)."""
    s, allowed = _scores(q, k, bias, causal, scale)
    has_key = allowed.any(-1, keepdim=True)
    # rows with no key: softmax over zeros, then zeroed; keeps gradients finite
    s = torch.where(has_key, s, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(~allowed, 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, shared_heads(v, q.shape[1]).to(p.dtype)).to(q.dtype)
    lse = torch.where(has_key, lse, -math.inf).squeeze(-1)
    return out, lse


class MathBackend(KernelBackend):
    name = "math"
    description = "plain torch ops (any device, dtype and mask; O(len^2) memory)"
    strides = ANY_STRIDES
    SUPPORTED_DEVICES = None
    SUPPORTED_DTYPES = None
    SUPPORTS_GQA = True
    SUPPORTS_VALUE_HEAD_DIM = True
    VARLEN: ClassVar[VarlenForm] = "padded"

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Any]:
        out, lse = attention_lse(q, k, v, bias, causal, scale)
        return out, lse, None

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        bias: Tensor | None,
        causal: bool,
        scale: float,
        state: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        kv_heads = k.shape[1]
        k, v = shared_heads(k, q.shape[1]), shared_heads(v, q.shape[1])
        s, allowed = _scores(q, k, bias, causal, scale)
        ct = s.dtype
        lse = lse.to(ct)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]
        p = torch.exp(s - lse).masked_fill(~allowed, 0.0)
        do = grad_out.to(ct)
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.to(ct).transpose(-1, -2))
        delta = (do * out.to(ct)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(ct))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(ct))
        dk, dv = (x.unflatten(1, (kv_heads, -1)).sum(2) for x in (dk, dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
