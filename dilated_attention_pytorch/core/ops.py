"""The one-device fused path as registered operators (``torch.library.custom_op``):
``dilated_attention::fused_forward`` and ``dilated_attention::fused_backward``,
each with a fake implementation and the pair linked by ``register_autograd``.
``torch.compile`` (``fullgraph=True``), ``torch.export`` and CUDA graphs see two
opaque operators of fixed output shapes and trace no Python of the fused path;
inside, the eager :func:`.fused.fused_forward` / :func:`.fused.fused_backward` run
with their in-place writes into buffers the operators allocate themselves, so
nothing an operator returns aliases its inputs and no input is mutated
(``mutates_args=()``)."""

# no `from __future__ import annotations`: custom_op reads the signature's types
from typing import Any

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from ..pattern import DilatedPattern, split_for_kv
from .bias import call_bias
from .fused import (
    FusedProblem,
    functorch_active,
    fused_backward,
    fused_forward,
    recomputed_grads,
    replayed_run,
    select_backends,
)
from .gather import gathered_attention


def _problems(
    query: Tensor,
    key: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    backend: str | None,
) -> list[FusedProblem]:
    b, n, h, _ = query.shape
    # grouped-query attention: calls cut where their query heads read key/value heads irregularly
    calls = split_for_kv(pattern.calls(n, h), h, key.shape[2])
    biases = [call_bias(c, key_bias, attn_bias, b) for c in calls]
    backends = select_backends(query, calls, [x is not None for x in biases], backend)
    return [FusedProblem(c, be, bias, is_causal) for c, be, bias in zip(calls, backends, biases)]


@torch.library.custom_op("dilated_attention::fused_forward", mutates_args=())
def fused_forward_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    head_slice: list[int],
    is_causal: bool,
    scale: float,
    backend: str | None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: out ``(batch, seq, heads, head_dim)`` in the query dtype,
    lse ``(batch, seq, heads)`` float32 (float64 for float64 inputs)."""
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)
    problems = _problems(query, key, key_bias, attn_bias, pattern, is_causal, backend)
    out, lse, _ = fused_forward(query, key, value, problems, pattern, scale)
    return out, lse


@fused_forward_op.register_fake
def _(query: Tensor, key: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    b, n, h, d = query.shape
    return query.new_empty(b, n, h, d), query.new_empty((b, n, h), dtype=accumulation_dtype(query.dtype))


@torch.library.custom_op("dilated_attention::fused_backward", mutates_args=())
def fused_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_mode: str,
    head_slice: list[int],
    is_causal: bool,
    scale: float,
    backend: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`fused_forward_op`, contiguous, in the inputs' shapes."""
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)
    problems = _problems(query, key, key_bias, attn_bias, pattern, is_causal, backend)
    run = replayed_run(problems, pattern, query.shape[1], query.shape[2], scale, query.device)
    return fused_backward(run, grad_out, query, key, value, out, lse)


@fused_backward_op.register_fake
def _(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value))  # type: ignore[return-value]


#: the operators' arguments after query, key, value, key_bias, attn_bias
_STATIC = slice(5, None)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, key_bias, attn_bias = inputs[:5]
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, key_bias, attn_bias)
    ctx.static = inputs[_STATIC]
    # the lse is returned for the caller's information only: no gradient flows through it
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    query, key, value, out, lse, key_bias, attn_bias = ctx.saved_tensors
    none = (None,) * (len(ctx.static) + 2)
    # grad mode is on in a backward only under create_graph=True (double backward);
    # batched gradients (vmap, is_grads_batched) come as functorch tensors
    if torch.is_grad_enabled() or functorch_active(grad_out):
        segment_lengths, dilation_rates, head_mode, head_slice, is_causal, scale, _ = ctx.static
        pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)

        def recompute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return gathered_attention(q, k, v, key_bias, attn_bias, pattern, is_causal, scale)

        grads = recomputed_grads(recompute, (query, key, value), ctx.needs_input_grad[:3], grad_out)
        return (*grads, *none)
    dq, dk, dv = fused_backward_op(grad_out, query, key, value, out, lse, key_bias, attn_bias, *ctx.static)
    return (dq, dk, dv, *none)


fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_local(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    backend: str | None,
) -> tuple[Tensor, Tensor | None]:
    """``(out, lse)`` of one device's fused path through the registered operators;
    under ``torch.func`` transforms the same function in differentiable ops (lse None)."""
    if functorch_active(query, key, value):
        return gathered_attention(query, key, value, key_bias, attn_bias, pattern, is_causal, scale), None
    return fused_forward_op(
        query,
        key,
        value,
        key_bias,
        attn_bias,
        *pattern.op_args(),
        is_causal,
        float(scale),
        backend,
    )


__all__ = ["fused_backward_op", "fused_forward_op", "fused_local"]
