"""Argument checks of every entry point: one rule in one place, each error
naming the argument and the rule (the checks of NATTEN's ``utils/checks.py``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Method = Literal["fused", "gather", "flex"]


METHODS: tuple[str, ...] = ("fused", "gather", "flex")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; bool is refused (True as a length is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums, lse and mask biases of ``dtype`` inputs are kept: float64 for
    float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int, int]:
    """Check the shapes, dtypes and devices of a call; returns ``query.shape``.

    ``query`` ``(batch, seqlen_q, heads, head_dim)``; ``key`` and ``value``
    ``(batch, seqlen_k, kv_heads, head_dim)`` with ``heads % kv_heads == 0``
    (grouped-query attention) and ``seqlen_q <= seqlen_k`` (the queries are the
    last ``seqlen_q`` positions)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x.shape)}; "
                "for (batch, heads, seq, head_dim) tensors pass x.transpose(1, 2)"
            )
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    b, n_q, h, d = query.shape
    if key.shape[:3] != value.shape[:3] or key.shape[0] != b or key.shape[3] != d:
        raise ValueError(
            "key must have shape (batch, seqlen_k, kv_heads, head_dim) with the query's batch and head_dim, "
            "and value (batch, seqlen_k, kv_heads, head_dim_v) with the key's first three sizes (query is "
            f"(batch, seqlen_q, heads, head_dim) = {tuple(query.shape)}); got key {tuple(key.shape)}, value "
            f"{tuple(value.shape)}"
        )
    n_k, kv_heads = key.shape[1], key.shape[2]
    if kv_heads == 0 or h % kv_heads:
        raise ValueError(
            f"heads % kv_heads must be 0 (grouped-query attention: query head j reads key/value head "
            f"j // (heads // kv_heads)), got heads = {h} (query.shape[2]) and kv_heads = {kv_heads} "
            "(key.shape[2])"
        )
    if n_q > n_k:
        raise ValueError(
            f"seqlen_q must be <= seqlen_k (the queries are the last seqlen_q positions of the keys), "
            f"got seqlen_q = {n_q} (query.shape[1]) and seqlen_k = {n_k} (key.shape[1])"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if query.numel() == 0:
        raise ValueError(
            f"query must have non-empty batch, seq, heads and head_dim, got {tuple(query.shape)}"
        )
    return tuple(query.shape)  # type: ignore[return-value]


def check_scale(softmax_scale: float | None) -> None:
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float))
        and not isinstance(softmax_scale, bool)
        and math.isfinite(softmax_scale)
        and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    if softmax_scale is not None and softmax_scale > MAX_SOFTMAX_SCALE:
        raise ValueError(
            f"softmax_scale must be at most {MAX_SOFTMAX_SCALE:g}, got {softmax_scale!r}: scores that large "
            "keep no float32 precision (and overflow to NaN past 3e38); scale the queries instead"
        )


#: the largest softmax_scale accepted (1 / sqrt(head_dim) is the usual one)
MAX_SOFTMAX_SCALE = 1e6


def check_dropout(dropout_p: float, name: str = "dropout_p") -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def may_sync(x: Tensor) -> bool:
    """Whether a value check that reads back to the host may run: not while compiling
    or capturing a CUDA graph (a sync would break either)."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def canonical_mask(mask: Tensor, name: str) -> Tensor:
    """``mask`` as bool (True = masked out) or float (added to the scores).

    Integer masks must hold only 0 and 1 and are read as bool (1 = masked out,
    as ``mask.bool()``). Float masks must hold no NaN and no +inf (either makes
    the row's output NaN; -inf removes a key). Both value checks read one flag
    back to the host (skipped while compiling or capturing a CUDA graph).
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point:
        if may_sync(mask) and bool((torch.isnan(mask) | (mask == math.inf)).any()):
            raise ValueError(
                f"{name} holds NaN or +inf: a float mask is added to the scores (-inf removes a key), "
                "and NaN or +inf would make the row's output NaN"
            )
        return mask
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer 0/1 or floating point, got {mask.dtype}")
    if may_sync(mask) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"{name} of dtype {mask.dtype} must hold only 0 and 1 (1 = masked out, as mask.bool()); "
            "pass a float mask to add values to the scores"
        )
    return mask != 0


def mask_to_bias(mask: Tensor, dtype: torch.dtype, name: str = "mask") -> Tensor:
    """A mask (see :func:`canonical_mask`) as an additive bias of ``dtype``."""
    mask = canonical_mask(mask, name)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)


def fits_4d(x: Tensor, batch: int, heads: int, size: int, size_k: int | None = None) -> bool:
    """Whether ``x`` is ``(batch | 1, heads | 1, size, size_k)`` (``size_k`` defaults to ``size``)."""
    cols = size if size_k is None else size_k
    return (
        x.dim() == 4 and x.shape[0] in (1, batch) and x.shape[1] in (1, heads) and x.shape[2:] == (size, cols)
    )


def prepare_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    seqlen_k: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate the masks and turn them into additive biases.

    ``shape`` is the query's ``(batch, seqlen_q, heads, head_dim)``;
    ``seqlen_k`` defaults to ``seqlen_q``. Returns ``key_bias``
    ``(batch, seqlen_k)`` and ``attn_bias`` ``(batch | 1, heads | 1, seqlen_q,
    seqlen_k)``, float32 (float64 for float64 inputs).
    """
    b, n, h, _ = shape
    n_k = n if seqlen_k is None else seqlen_k
    bias_dtype = accumulation_dtype(dtype)
    key_bias = attn_bias = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, n_k):
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else key_padding_mask
            raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = {(b, n_k)}, got {got}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")
        key_bias = mask_to_bias(key_padding_mask, bias_dtype, "key_padding_mask")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        if not fits_4d(attn_mask, b, h, n, n_k):
            raise ValueError(
                "attn_mask must have shape (seqlen_q, seqlen_k) or (batch | 1, heads | 1, seqlen_q, "
                f"seqlen_k) = ({b} | 1, {h} | 1, {n}, {n_k}), got {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != device:
            raise ValueError(f"attn_mask must be on {device}, got {attn_mask.device}")
        attn_bias = mask_to_bias(attn_mask, bias_dtype, "attn_mask")
    return key_bias, attn_bias


def validate_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    dropout_p: float,
    softmax_scale: float | None,
    method: str,
) -> tuple[tuple[int, int, int, int], Tensor | None, Tensor | None, float]:
    """Check every argument of a call; returns the shape, the mask biases
    (see :func:`prepare_masks`) and the softmax scale."""
    shape = check_inputs(query, key, value)
    check_scale(softmax_scale)
    check_dropout(dropout_p)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    key_bias, attn_bias = prepare_masks(
        key_padding_mask, attn_mask, shape, query.dtype, query.device, key.shape[1]
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(shape[3])
    return shape, key_bias, attn_bias, scale


def refuse_torchscript(scripting: bool = False) -> None:
    """TorchScript cannot hold the function: raise, with what to use instead."""
    if scripting or torch.jit.is_tracing():
        raise RuntimeError(
            "TorchScript (torch.jit.script / torch.jit.trace) is not supported by dilated attention: "
            "its problems depend on the sequence length, which a trace would freeze. Use torch.compile, "
            "or torch.export.export for a graph of the model"
        )


def warn_unusual_layout(
    segment_lengths: Sequence[int], head_mode: str, shape: tuple[int, int, int, int], sdpa_layout: bool = True
) -> None:
    """Warn about shapes that run but are likely a mistake: more "heads" than
    positions with every segment covering the sequence (a ``(batch, heads, seq,
    head_dim)`` tensor, SDPA's layout, read as ``(batch, seq, heads, head_dim)``),
    and grouped heads fewer than branches (the branches without a head are unused)."""
    _, n, h, _ = shape
    if sdpa_layout and h > n and all(w >= n for w in segment_lengths):
        warnings.warn(
            f"query has {h} heads and {n} positions, and every segment covers the sequence: inputs are "
            "(batch, seq, heads, head_dim); for (batch, heads, seq, head_dim) tensors (SDPA's layout) pass "
            "x.transpose(1, 2)",
            stacklevel=3,
        )
    if head_mode == "grouped" and h < len(segment_lengths):
        warnings.warn(
            f"head_mode='grouped' with {h} heads and {len(segment_lengths)} branches: branches "
            f"{list(range(h, len(segment_lengths)))} (the longest segments) get no head and are not used; "
            "use more heads or head_mode='all'",
            stacklevel=3,
        )
