"""Masks restricted to one branch call, and the rows they leave without a key."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..pattern import BranchCall
from ..sparse.block_layout import BlockLayout, layout_bias
from .views import positions


def call_bias(
    call: BranchCall,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    batch: int,
    call_positions: Tensor | None = None,
    layout: BlockLayout | None = None,
) -> Tensor | None:
    """The masks and block layout restricted to ``call``:
    ``(batch·segments, 1 | heads, 1 | length, length)``, or None without any.
    ``call_positions``: the call's :func:`~.views.positions`, if already computed."""
    if key_bias is None and attn_bias is None and layout is None:
        return None
    if call_positions is None:
        ref = next(
            x for x in (key_bias, attn_bias, layout.blocks if layout is not None else None) if x is not None
        )
        call_positions = positions(call, ref.device)
    s, m = call_positions.shape

    def per_problem(x: Tensor) -> Tensor:
        """``(B', H', s, m, m)`` -> ``(batch·segments, 1 | heads, m, m)``."""
        return x.transpose(1, 2).expand(batch, s, x.shape[1], m, m).reshape(batch * s, -1, m, m)

    parts = []
    if key_bias is not None:
        parts.append(key_bias[:, call_positions].reshape(batch * s, 1, 1, m))
    if attn_bias is not None:
        if attn_bias.shape[1] > 1:
            attn_bias = attn_bias[:, torch.tensor(call.heads(), device=attn_bias.device)]
        parts.append(per_problem(attn_bias[:, :, call_positions[:, :, None], call_positions[:, None, :]]))
    if layout is not None:
        at = call_positions + layout.offset
        allowed = layout_bias(layout.blocks, layout.block_size, at, at, layout.bias_dtype, call.heads())
        parts.append(per_problem(allowed))
    bias = parts[0]
    for part in parts[1:]:
        bias = bias + part
    return bias


def rows_with_keys(bias: Tensor, causal: bool) -> Tensor:
    """Bool ``(batch, 1 | heads, 1 | length)``: query rows the bias leaves a key.

    Derived from the bias, not the kernel's lse: kernels disagree on what a
    fully masked row returns (the CPU flash kernel gives lse 0).
    """
    allowed = bias > -math.inf
    if causal:
        if allowed.shape[-2] == 1:  # key-only bias: row m keeps a key iff one of 0..m is allowed
            return (allowed.cumsum(-1) > 0).squeeze(-2)
        m = allowed.shape[-1]
        allowed = allowed & torch.ones(m, m, dtype=torch.bool, device=bias.device).tril()
    return allowed.any(-1)


def sanitize(out: Tensor, lse: Tensor, has_key: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with no key: output 0 and lse -inf, whatever the kernel gave."""
    return out.masked_fill(~has_key[..., None], 0.0), lse.masked_fill(~has_key, -math.inf)
