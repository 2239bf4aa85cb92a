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
import inspect
from typing import Any

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from ..pattern import DilatedPattern, split_for_kv
from .bias import call_bias
from .fused import (
    FusedProblem,
    Recompute,
    fake_grads,
    functorch_active,
    fused_backward,
    fused_forward,
    register_operator_autograd,
    replayed_run,
    select_backends,
)
from .gather import gathered_attention
from .views import stacked_view


def _problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    backend: str | None,
) -> list[FusedProblem]:
    b, n, h, _ = query.shape
    # "all" mode: heads batched along diagonals where that takes fewer calls; not under
    # grouped-query attention (the query heads of a key/value head read one set of
    # positions) or with biases (built per call, one set of positions)
    diagonal = key.shape[2] == h and key_bias is None and attn_bias is None
    # grouped-query attention: calls cut where their query heads read key/value heads irregularly
    calls = split_for_kv(pattern.calls(n, h, diagonal=diagonal), h, key.shape[2])
    biases = [call_bias(c, key_bias, attn_bias, b) for c in calls]
    backends = select_backends(query, value, calls, [x is not None for x in biases], backend)
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
    """``(out, lse)``: out ``(batch, seq, heads, head_dim_v)`` in the query dtype,
    lse ``(batch, seq, heads)`` float32 (float64 for float64 inputs)."""
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)
    problems = _problems(query, key, value, key_bias, attn_bias, pattern, is_causal, backend)
    out, lse, _ = fused_forward(query, key, value, problems, pattern, scale)
    return out, lse


@fused_forward_op.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    b, n, h, _ = query.shape
    out = query.new_empty(b, n, h, value.shape[3])
    return out, query.new_empty((b, n, h), dtype=accumulation_dtype(query.dtype))


def _replayed_grads(args: tuple[Any, ...], stacked: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fused backward of the backward operators' ``args``."""
    grad_out, query, key, value, out, lse, key_bias, attn_bias, *pattern_args, is_causal, scale, backend = (
        args
    )
    pattern = DilatedPattern.from_op_args(*pattern_args)
    problems = _problems(query, key, value, key_bias, attn_bias, pattern, is_causal, backend)
    run = replayed_run(problems, pattern, query, scale)
    return fused_backward(run, grad_out, query, key, value, out, lse, stacked=stacked)


def _fused_backward(
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
    pattern_args = (segment_lengths, dilation_rates, head_mode, head_slice)
    args = (
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        key_bias,
        attn_bias,
        *pattern_args,
        is_causal,
        scale,
        backend,
    )
    return _replayed_grads(args, stacked=False)


fused_backward_op = torch.library.custom_op(
    "dilated_attention::fused_backward", _fused_backward, mutates_args=()
)
fused_backward_op.register_fake(fake_grads)


def _fused_backward_stacked(*args: Any) -> Tensor:
    """:func:`fused_backward_op`'s gradients as one ``(batch, seq, 3, heads,
    head_dim)`` tensor, slice ``i`` of dim 2 the gradient of query, key, value; for
    inputs of one shape."""
    whole = stacked_view(_replayed_grads(args, stacked=True), 2)
    assert whole is not None, "fused_backward(stacked=True) returns slices of one tensor"
    return whole


# fused_backward's arguments (one schema to keep in step), in a second operator rather
# than one more argument of the first: compiled graphs that an earlier release cached
# on disk call fused_backward with the schema it had then
_fused_backward_stacked.__signature__ = inspect.signature(_fused_backward).replace(  # type: ignore[attr-defined]
    return_annotation=Tensor
)
fused_backward_stacked_op = torch.library.custom_op(
    "dilated_attention::fused_backward_stacked", _fused_backward_stacked, mutates_args=()
)


@fused_backward_stacked_op.register_fake
def _(grad_out: Tensor, query: Tensor, *args: Any) -> Tensor:
    b, n, h, d = query.shape
    return query.new_empty(b, n, 3, h, d)


def _recompute_for(other: tuple[Any, ...], static: tuple[Any, ...]) -> Recompute:
    key_bias, attn_bias = other
    segment_lengths, dilation_rates, head_mode, head_slice, is_causal, scale, _ = static
    pattern = DilatedPattern.from_op_args(segment_lengths, dilation_rates, head_mode, head_slice)

    def recompute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return gathered_attention(q, k, v, key_bias, attn_bias, pattern, is_causal, scale)

    return recompute


# after query, key, value: key_bias and attn_bias
register_operator_autograd(fused_forward_op, fused_backward_op, 5, _recompute_for, fused_backward_stacked_op)


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


__all__ = ["fused_backward_op", "fused_backward_stacked_op", "fused_forward_op", "fused_local"]
