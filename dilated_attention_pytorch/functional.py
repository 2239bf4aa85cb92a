"""The public functional API: :func:`dilated_attention` and, for packed
documents, :func:`dilated_attention_varlen`.

The function is docs/semantics.md's. Each branch of the pattern is cut into
batched attention problems (:meth:`DilatedPattern.calls`): all segments of one
length and all heads that share an offset form one
``(batch·segments, heads, length, head_dim)`` problem, run by one of three paths:

- ``method="fused"`` (:mod:`.core.fused`, ImprovedDilatedAttention): strided
  views, one lse-returning kernel call per problem, results in place;
- ``method="gather"`` (:mod:`.core.gather`, DilatedAttention): copy-gather,
  plain torch under autograd, scatter back;
- ``method="flex"`` (:mod:`.sparse.flex`): FlexAttention with a block mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import METHODS, Method, refuse_torchscript, validate_call, warn_unusual_layout
from .core.fused import functorch_active
from .core.gather import gathered_attention
from .core.last_query import last_query_attention
from .core.merge import merge_by_lse
from .core.ops import fused_local
from .core.packed import packed_attention, packed_backend
from .core.varlen import grouped_by_length, host_bounds
from .core.window import QueryWindow
from .pattern import DilatedPattern, HeadMode, as_pattern
from .sparse.block_layout import BlockLayout, one_block, prepare_layout
from .sparse.flex import flex_path

__all__ = ["METHODS", "Method", "dilated_attention", "dilated_attention_varlen", "merge_by_lse"]


def dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int] | DilatedPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    method: Method = "fused",
    backend: str | None = None,
    block_layout: Tensor | None = None,
    block_size: int = 128,
    return_lse: bool = False,
) -> Any:
    """Dilated attention (docs/semantics.md).

    Args:
        query: ``(batch, seqlen_q, heads, head_dim)``, any strides. The queries
            are the last ``seqlen_q`` positions of the key sequence
            (``seqlen_q <= seqlen_k``; decoding, chunked prefill): the pattern
            is evaluated at their absolute positions.
        key: ``(batch, seqlen_k, kv_heads, head_dim)`` with
            ``heads % kv_heads == 0`` (grouped-query and multi-query attention):
            query head ``j`` reads key/value head ``j // (heads // kv_heads)``.
        value: ``(batch, seqlen_k, kv_heads, head_dim_v)``; ``head_dim_v`` may
            differ from ``head_dim`` (the fused path runs it on the kernels
            that declare ``SUPPORTS_VALUE_HEAD_DIM``).
        segment_lengths: the branches' segment lengths, or a ready
            :class:`DilatedPattern` (then ``dilation_rates`` and ``head_mode``
            are ignored).
        dilation_rates: one per segment length.
        head_mode: ``"grouped"`` (heads split into one group per branch) or
            ``"all"`` (every head in every branch). Head groups and offsets are
            taken over query heads.
        is_causal: a query sees only keys at positions <= its own.
        key_padding_mask: ``(batch, seqlen_k)``; bool True = ignore that key, or
            float (added).
        attn_mask: ``(seqlen_q, seqlen_k)`` or
            ``(batch | 1, heads | 1, seqlen_q, seqlen_k)``; bool True = not
            allowed (the ``nn.MultiheadAttention`` convention), or float (added
            to the scores). Applied on top of the pattern.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        method: ``"fused"`` (strided views, fused kernels), ``"gather"``
            (copy-gather, plain torch) or ``"flex"`` (FlexAttention with a block
            mask; CUDA, or CPU without gradients; no dropout). With dropout,
            "fused" copy-gathers and runs PyTorch's SDPA (grouped heads, no
            mask) or plain torch.
        backend: kernel for the fused path (see :mod:`.kernels`); None picks the
            fastest that can run the call. A named backend runs every branch
            problem it accepts; the few it refuses by length (cuDNN at length 1)
            run on the best backend that accepts them.
        block_layout: bool ``(n_blocks, n_blocks)``, ``(heads | 1, n_blocks, n_blocks)``
            or ``(batch | 1, heads | 1, n_blocks, n_blocks)`` with
            ``n_blocks = ceil(seq / block_size)``: queries of block ``Q`` see keys
            of block ``K`` only where it is True (on top of the pattern and masks).
            Runs with ``method="flex"`` or ``"gather"``, and ``seqlen_q == seqlen_k``.
        block_size: positions per block of ``block_layout``.
        return_lse: also return the merged log-sum-exp, to merge this attention
            with another (say a global-token branch) by :func:`merge_by_lse`.

    Returns:
        ``(batch, seqlen_q, heads, head_dim_v)``; a (position, head) with no key is 0.
        With ``return_lse``: ``(out, lse)``, lse ``(batch, seqlen_q, heads)`` float32
        (float64 for float64 inputs), -inf where no key. It is differentiable: where
        gradients are recorded the call runs the gather path (the fused kernels'
        backward takes no lse gradient); without them, the fused path.
    """
    refuse_torchscript()
    pattern = as_pattern(segment_lengths, dilation_rates, head_mode)
    return _dilated_attention(
        query, key, value, pattern, is_causal, key_padding_mask, attn_mask, dropout_p, softmax_scale,
        method, backend, block_layout, block_size, return_lse, warn_layout=True,
    )  # fmt: skip


def _dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pattern: DilatedPattern,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    dropout_p: float,
    softmax_scale: float | None,
    method: Method,
    backend: str | None,
    block_layout: Tensor | None = None,
    block_size: int = 128,
    return_lse: bool = False,
    warn_layout: bool = True,
) -> Any:
    """:func:`dilated_attention` of a built pattern; ``warn_layout``: warn about a
    likely SDPA-layout input (not for the per-document calls of packed inputs, nor
    for the multihead modules, whose projections fix the layout)."""
    shape, key_bias, attn_bias, scale = validate_call(
        query, key, value, is_causal, key_padding_mask, attn_mask, dropout_p, softmax_scale, method
    )
    # a head slice is judged as the layer it belongs to
    layer_heads = shape[2] if pattern.total_heads is None else pattern.total_heads
    warn_unusual_layout(
        pattern.segment_lengths,
        pattern.head_mode,
        (shape[0], key.shape[1], layer_heads, shape[3]),
        sdpa_layout=warn_layout,
    )
    if shape[1] != key.shape[1]:
        if block_layout is not None:
            raise ValueError(
                "block_layout needs seqlen_q == seqlen_k, got seqlen_q = "
                f"{shape[1]} and seqlen_k = {key.shape[1]}"
            )
        if shape[1] == 1 and dropout_p == 0.0:  # a decoding step: the query's keys only
            out, lse = last_query_attention(query, key, value, key_bias, attn_bias, pattern, scale)
            return (out, lse) if return_lse else out
        window = QueryWindow.of(pattern, shape[1], key.shape[1])
        result = _attention(
            window.queries(query), window.keys(key), window.keys(value), window.keys(key_bias),
            window.attn_mask(attn_bias), pattern, is_causal, scale, dropout_p, method, backend, None,
            return_lse,
        )  # fmt: skip
        return tuple(window.outputs(x) for x in result) if return_lse else window.outputs(result)
    layout = None
    if block_layout is not None:
        layout = prepare_layout(block_layout, block_size, shape, query.dtype, query.device)
        if method == "fused":
            raise ValueError(
                "block_layout runs with method='flex' (FlexAttention) or method='gather', not 'fused'"
            )
    return _attention(
        query, key, value, key_bias, attn_bias, pattern, is_causal, scale, dropout_p, method, backend, layout,
        return_lse,
    )  # fmt: skip


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    method: Method,
    backend: str | None,
    layout: BlockLayout | None,
    return_lse: bool = False,
) -> Any:
    """:func:`dilated_attention` of checked arguments, ``seqlen_q == seqlen_k``."""
    shape = query.shape
    if return_lse and method == "flex":
        raise ValueError("return_lse is not supported with method='flex'; use method='fused' or 'gather'")
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if return_lse and (recording or functorch_active(query, key, value)):
        method = "gather"  # the one path whose lse carries a gradient
    if method == "flex" and functorch_active(query, key, value):
        method = "gather"  # the same function in ops torch.func can transform
    if value.shape[3] != shape[3] and method == "flex":
        raise ValueError(
            f"method='flex' needs the value's head_dim ({value.shape[3]}) to equal the query's "
            f"({shape[3]}); use method='fused' or 'gather'"
        )
    if method == "flex":
        if dropout_p > 0.0:
            raise ValueError(
                "method='flex' has no dropout (FlexAttention); use method='gather' for dropout_p > 0"
            )
        if layout is None:  # one block: every pair the pattern allows
            layout = prepare_layout(one_block(query.device), shape[1], shape, query.dtype, query.device)
        return flex_path(query, key, value, key_bias, attn_bias, pattern, layout, is_causal, scale)
    if method == "gather" or dropout_p > 0.0:
        return gathered_attention(
            query, key, value, key_bias, attn_bias, pattern, is_causal, scale, dropout_p, layout,
            sdpa=method == "fused" and layout is None, return_lse=return_lse,
        )  # fmt: skip
    out, lse = fused_local(query, key, value, key_bias, attn_bias, pattern, is_causal, scale, backend)
    return (out, lse) if return_lse else out


def dilated_attention_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int | None,
    segment_lengths: Sequence[int] | DilatedPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    head_mode: HeadMode = "grouped",
    is_causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    method: Method = "fused",
    backend: str | None = None,
) -> Tensor:
    """Dilated attention of packed documents (the flash-attn varlen layout): each
    document is its own sequence (segments start at its first token, its last
    segment may be shorter, nothing attends across documents).

    Args:
        query: ``(total_tokens, heads, head_dim)``, the documents one after another.
        key: ``(total_tokens, kv_heads, head_dim)``, ``heads % kv_heads == 0``.
        value: ``(total_tokens, kv_heads, head_dim)``.
        cu_seqlens: int32 or int64 ``(num_docs + 1,)``: document ``i`` is rows
            ``cu_seqlens[i] .. cu_seqlens[i + 1]``; starts at 0, non-decreasing, ends
            at ``total_tokens``, on the inputs' device. From per-token document ids:
            :func:`~.core.varlen.cu_seqlens_from_document_ids`.
        max_seqlen: the longest document's length (checked; None: not given).
        segment_lengths: as in :func:`dilated_attention`.
        dilation_rates: as in :func:`dilated_attention`.
        head_mode: as in :func:`dilated_attention`.
        is_causal: as in :func:`dilated_attention`.
        dropout_p: as in :func:`dilated_attention`.
        softmax_scale: as in :func:`dilated_attention`.
        method: as in :func:`dilated_attention`.
        backend: as in :func:`dilated_attention`.

    Returns:
        ``(total_tokens, heads, head_dim)``.

    With ``method="fused"`` on a kernel with a varlen form (SDPA's flash kernel
    on CUDA; on CPU the flash kernel's padded form), each branch problem is one
    call across all documents (:mod:`.core.packed`); otherwise documents run in
    groups of equal padded length, one batched call each (:mod:`.core.varlen`).
    Reads ``cu_seqlens`` on the host (one sync); under ``torch.compile`` inside
    the registered operator of the varlen form (no graph break), else a graph break.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim) with cu_seqlens, got {got}")
    if key.shape[0] != query.shape[0]:
        raise ValueError(
            f"key and value must have the query's total_tokens ({query.shape[0]}), got {key.shape[0]}"
        )
    pattern = as_pattern(segment_lengths, dilation_rates, head_mode)
    # every other rule (heads, dtypes, devices, scale, dropout) on a batch-1 view
    *_, scale = validate_call(
        query[None], key[None], value[None], is_causal, None, None, dropout_p, softmax_scale, method
    )
    chosen = None
    if method == "fused" and dropout_p == 0.0 and not functorch_active(query, key, value):
        chosen = packed_backend(query, value, backend)
    if chosen is not None:  # cu_seqlens is checked inside its operator (no graph break)
        out, _ = packed_attention(
            query, key, value, cu_seqlens, max_seqlen, pattern, is_causal, scale, chosen
        )
        return out

    bounds = host_bounds(cu_seqlens, query.shape[0], max_seqlen, query.device)

    def attention(q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None) -> Tensor:
        # causal queries never see the padding after them; otherwise it is masked
        return _dilated_attention(
            q, k, v, pattern, is_causal, None if is_causal else padding, None, dropout_p, softmax_scale,
            method, backend, warn_layout=False,
        )  # fmt: skip

    return grouped_by_length(query, key, value, bounds, attention)
