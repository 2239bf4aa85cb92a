"""``x.unbind(dim)`` whose backward returns the gradients' stacked view where they
already lie as slices of one tensor (:func:`~.views.stacked_view`), instead of the
``torch.stack`` copy of autograd's own unbind: the multihead modules' one projection
of queries, keys and values, whose gradients the fused backward writes into one
buffer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .views import stacked_view


class _Unbind(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> tuple[Tensor, ...]:
        ctx.dim, ctx.shape, ctx.dtype, ctx.device = dim, x.shape, x.dtype, x.device
        return x.unbind(dim)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None]:
        if any(g is None for g in grads):
            zeros = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device).unbind(ctx.dim)
            grads = tuple(z if g is None else g for g, z in zip(grads, zeros))
        stacked = stacked_view(grads, ctx.dim)  # type: ignore[arg-type]
        return (torch.stack(grads, ctx.dim) if stacked is None else stacked), None  # type: ignore[arg-type]


def unbind(x: Tensor, dim: int) -> tuple[Tensor, ...]:
    """``x.unbind(dim)``, for a backward without a copy where the gradients allow it.
    Under ``torch.compile`` the plain ``unbind``: the compiler plans the memory there,
    and the fused backward's stacked gradients are an eager path (fake tensors have no
    storage to compare)."""
    if torch.compiler.is_compiling():
        return x.unbind(dim)
    return _Unbind.apply(x, dim)
