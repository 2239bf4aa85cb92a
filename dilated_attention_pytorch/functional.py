"""The one implementation of dilated attention every module calls.

Each branch of the pattern is cut into batched attention problems
(:meth:`DilatedPattern.calls`): all segments of one length and all heads that
share an offset form one ``(batch·segments, heads, length, head_dim)`` problem.

Two ways to run them:

- ``method="fused"`` (ImprovedDilatedAttention): the problems are strided
  views of the inputs (no copies), each runs as one kernel call that also
  returns the log-sum-exp, outputs go straight into place and "all"-mode
  branches merge by lse. The backward is a custom ``autograd.Function`` that
  calls each kernel's backward with the *merged* output and lse (the identity
  ring attention uses), writing gradients into place.
- ``method="gather"`` (DilatedAttention): copy-gather each problem, run plain
  torch attention under autograd, scatter back. Readable, supports dropout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from ._cache import BoundedCache
from .kernels import flex as flex_kernel
from .kernels import math as math_kernel
from .kernels import triton_merge
from .pattern import BranchCall, BranchRows, DilatedPattern, HeadMode, as_pattern, compact_rows, split_heads

Method = Literal["fused", "gather", "flex"]
METHODS: tuple[str, ...] = ("fused", "gather", "flex")


# --------------------------------------------------------------------------
# validation and masks


def _check_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int, int]:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "query, key and value must have the same shape (batch, seq, heads, head_dim); "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
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


def _check_scale(softmax_scale: float | None) -> None:
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


def _check_dropout(dropout_p: float, name: str = "dropout_p") -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def _bias_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _may_sync(x: Tensor) -> bool:
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
        if _may_sync(mask) and bool((torch.isnan(mask) | (mask == math.inf)).any()):
            raise ValueError(
                f"{name} holds NaN or +inf: a float mask is added to the scores (-inf removes a key), "
                "and NaN or +inf would make the row's output NaN"
            )
        return mask
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer 0/1 or floating point, got {mask.dtype}")
    if _may_sync(mask) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"{name} of dtype {mask.dtype} must hold only 0 and 1 (1 = masked out, as mask.bool()); "
            "pass a float mask to add values to the scores"
        )
    return mask != 0


def _mask_to_bias(mask: Tensor, dtype: torch.dtype, name: str = "mask") -> Tensor:
    """A mask (see :func:`canonical_mask`) as an additive bias of ``dtype``."""
    mask = canonical_mask(mask, name)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)


def _fits_4d(x: Tensor, batch: int, heads: int, size: int) -> bool:
    """Whether ``x`` is ``(batch | 1, heads | 1, size, size)``."""
    return (
        x.dim() == 4 and x.shape[0] in (1, batch) and x.shape[1] in (1, heads) and x.shape[2:] == (size, size)
    )


def prepare_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate the masks and turn them into additive biases.

    Returns ``key_bias`` ``(batch, seq)`` and ``attn_bias``
    ``(batch | 1, heads | 1, seq, seq)``, float32 (float64 for float64 inputs).
    """
    b, n, h, _ = shape
    bias_dtype = _bias_dtype(dtype)
    key_bias = attn_bias = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, n):
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else key_padding_mask
            raise ValueError(f"key_padding_mask must have shape (batch, seq) = {(b, n)}, got {got}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")
        key_bias = _mask_to_bias(key_padding_mask, bias_dtype, "key_padding_mask")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        if not _fits_4d(attn_mask, b, h, n):
            raise ValueError(
                "attn_mask must have shape (seq, seq) or (batch | 1, heads | 1, seq, seq) = "
                f"({b} | 1, {h} | 1, {n}, {n}), got {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != device:
            raise ValueError(f"attn_mask must be on {device}, got {attn_mask.device}")
        attn_bias = _mask_to_bias(attn_mask, bias_dtype, "attn_mask")
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
    shape = _check_inputs(query, key, value)
    _check_scale(softmax_scale)
    _check_dropout(dropout_p)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    key_bias, attn_bias = prepare_masks(key_padding_mask, attn_mask, shape, query.dtype, query.device)
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


# --------------------------------------------------------------------------
# geometry of one call


def _positions(call: BranchCall, device: torch.device) -> Tensor:
    """Sequence positions of ``call``, ``(segments, length)``."""
    seg = torch.arange(call.num_segments, device=device) * call.segment_length
    m = torch.arange(call.length, device=device) * call.dilation
    return call.start + call.offset + seg[:, None] + m[None, :]


def _strided(x: Tensor, call: BranchCall, first_head: int = 0) -> Tensor:
    """``x[:, positions, heads]`` as a view ``(batch, segments, length, heads, *rest)``
    of a ``(batch, seq, heads, *rest)`` tensor, for any input strides; ``x`` may
    hold only the heads from ``first_head`` on.

    One ``as_strided`` rather than a chain of slices: it is called a dozen times
    per problem and the slices' host time showed at small n."""
    stride_b, stride_n, stride_h, *rest = x.stride()
    return x.as_strided(
        (x.shape[0], call.num_segments, call.length, call.num_heads, *x.shape[3:]),
        (
            stride_b,
            call.segment_length * stride_n,
            call.dilation * stride_n,
            call.head_step * stride_h,
            *rest,
        ),
        _first_element(x, call, first_head),
    )


def _first_element(x: Tensor, call: BranchCall, first_head: int = 0) -> int:
    """Storage offset of ``x``'s element at the call's first position and head."""
    _, stride_n, stride_h = x.stride()[:3]
    return (
        x.storage_offset() + (call.start + call.offset) * stride_n + (call.head_start - first_head) * stride_h
    )


def _problem_view(x: Tensor, call: BranchCall) -> Tensor:
    """``x[:, positions, heads]`` in problem layout ``(batch·segments, heads, length, *rest)``:
    one view unless batch > 1, the call has several segments and batch·segments is
    not one dimension of ``x`` (segments that do not tile it, or an unusual batch
    stride): then a copy."""
    stride_b, stride_n, stride_h, *rest = x.stride()
    batch, segments = x.shape[0], call.num_segments
    stride_segment = call.segment_length * stride_n
    if batch > 1 and segments > 1 and stride_b != segments * stride_segment:
        return _strided(x, call).flatten(0, 1).transpose(1, 2)
    return x.as_strided(
        (batch * segments, call.num_heads, call.length, *x.shape[3:]),
        (
            stride_segment if segments > 1 else stride_b,
            call.head_step * stride_h,
            call.dilation * stride_n,
            *rest,
        ),
        _first_element(x, call),
    )


def _from_problem(x: Tensor, batch: int) -> Tensor:
    """Inverse of :func:`_problem_view` (may copy)."""
    x = x.transpose(1, 2)
    return x.reshape(batch, x.shape[0] // batch, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """A block layout of validated shape: ``blocks`` bool ``(batch | 1, heads | 1, nb, nb)``
    over blocks of ``block_size`` positions, True = allowed; ``offset`` is the
    sequence position of local position 0 (a rank's shard start), ``bias_dtype``
    the dtype of the additive biases built from it."""

    blocks: Tensor
    block_size: int
    bias_dtype: torch.dtype
    offset: int = 0
    #: the tensor the caller passed (block masks are cached on it)
    source: Tensor | None = None

    @property
    def cache_owner(self) -> Tensor:
        """The tensor that cached block masks and exchange plans are keyed by."""
        return self.source if self.source is not None else self.blocks


def _call_bias(
    call: BranchCall,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    batch: int,
    positions: Tensor | None = None,
    layout: BlockLayout | None = None,
) -> Tensor | None:
    """The masks and block layout restricted to ``call``:
    ``(batch·segments, 1 | heads, 1 | length, length)``, or None without any.
    ``positions``: the call's, if already computed."""
    if key_bias is None and attn_bias is None and layout is None:
        return None
    if positions is None:
        ref = next(x for x in (key_bias, attn_bias, layout and layout.blocks) if x is not None)
        positions = _positions(call, ref.device)
    s, m = positions.shape

    def pairs(x: Tensor, index: Tensor) -> Tensor:
        """``(B', H', ., .)`` at index pairs -> ``(batch·segments, 1 | heads, m, m)``."""
        if x.shape[1] > 1:
            x = x[:, torch.tensor(call.heads(), device=x.device)]
        x = x[:, :, index[:, :, None], index[:, None, :]]  # (B', H', s, m, m)
        return x.transpose(1, 2).expand(batch, s, x.shape[1], m, m).reshape(batch * s, -1, m, m)

    parts = []
    if key_bias is not None:
        parts.append(key_bias[:, positions].reshape(batch * s, 1, 1, m))
    if attn_bias is not None:
        parts.append(pairs(attn_bias, positions))
    if layout is not None:
        allowed = pairs(layout.blocks, (positions + layout.offset) // layout.block_size)
        parts.append(torch.zeros(allowed.shape, dtype=layout.bias_dtype, device=allowed.device))
        parts[-1].masked_fill_(~allowed, -math.inf)
    bias = parts[0]
    for part in parts[1:]:
        bias = bias + part
    return bias


def prepare_layout(
    block_layout: Tensor,
    block_size: int,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    seq_len: int | None = None,
) -> BlockLayout:
    """Validate a block layout for inputs of ``shape`` (``seq_len``: of the whole
    sequence, when ``shape`` is a shard) and bring it to 4-D."""
    b, n, h, _ = shape
    n = seq_len if seq_len is not None else n
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(block_layout, Tensor):
        raise TypeError(f"block_layout must be a bool Tensor, got {type(block_layout).__name__}")
    if block_layout.dtype != torch.bool:
        raise ValueError(f"block_layout must be a bool tensor (True = allowed), got {block_layout.dtype}")
    nb = -(-n // block_size)
    layout = block_layout
    while layout.dim() < 4:
        layout = layout[None]
    if block_layout.dim() < 2 or not _fits_4d(layout, b, h, nb):
        raise ValueError(
            "block_layout must have shape (n_blocks, n_blocks), (heads | 1, n_blocks, n_blocks) or "
            f"(batch | 1, heads | 1, n_blocks, n_blocks) with n_blocks = ceil({n} / block_size {block_size}) "
            f"= {nb}, heads = {h}, batch = {b}; got {tuple(block_layout.shape)}"
        )
    if layout.device != device:
        raise ValueError(f"block_layout must be on {device}, got {layout.device}")
    return BlockLayout(layout, block_size, _bias_dtype(dtype), source=block_layout)


# --------------------------------------------------------------------------
# lse merge


def merge_by_lse(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial attention results of disjoint key sets (docs/semantics.md, "Merge").

    ``outs[i]``: ``(..., head_dim)``, ``lses[i]``: ``(...)``. Returns the merged
    output (float32, or float64 for float64 lse) and lse; where every lse is
    -inf the output is 0 and the lse -inf. Weighted relative to the largest lse
    (``exp(lse_i - max) / sum_j exp(lse_j - max)``), never through the merged
    lse: at large scores a float32 lse cannot hold ``log(branches)`` and the
    weights would not sum to 1. Differentiable, NaN-free gradients.
    """
    lse = torch.stack(list(lses))
    top = lse.amax(0, keepdim=True).detach()  # the result does not depend on it
    has_key = top > -math.inf
    top = torch.where(has_key, top, 0.0)
    weights = torch.exp(lse - top)
    total = weights.sum(0, keepdim=True)
    norm = torch.where(has_key, total, 1.0)
    out = ((weights / norm)[..., None] * torch.stack(list(outs)).to(weights.dtype)).sum(0)
    return out, torch.where(has_key, top + torch.log(norm), -math.inf).squeeze(0)


def merge_online(acc: Tensor, top: Tensor, total: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """One more term of an lse merge, in place on (strided) views: ``acc`` holds
    the outputs weighted by ``exp(lse - top)``, ``top`` the largest lse so far,
    ``total`` the sum of the weights (start: 0, -inf, 0; end: :func:`merge_finish`).
    Unnormalised, so no rounded lse enters a weight (see :func:`merge_by_lse`)."""
    new_top = torch.maximum(top, part_lse)
    safe = torch.where(new_top == -math.inf, 0.0, new_top)
    rescale, weight = torch.exp(top - safe), torch.exp(part_lse - safe)
    acc.mul_(rescale[..., None]).add_(part_out * weight[..., None])
    total.mul_(rescale).add_(weight)
    top.copy_(new_top)


def merge_finish(acc: Tensor, top: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of an online merge; 0 and -inf where no term had a key."""
    has_key = total > 0
    norm = torch.where(has_key, total, 1.0)
    return acc / norm[..., None], torch.where(has_key, top + torch.log(norm), -math.inf)


def _merge_into(out5: Tensor, top4: Tensor, total4: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """:func:`merge_online` (one fused pass on CUDA with Triton, torch ops elsewhere)."""
    if triton_merge.can_merge(out5, part_out):
        triton_merge.merge_into(out5, top4, total4, part_out, part_lse)
        return
    merge_online(out5, top4, total4, part_out.to(out5.dtype), part_lse.to(top4.dtype))


class _BranchBuffers:
    """Every branch's compact rows (:class:`~.pattern.BranchRows`) in one
    allocation: branch ``i`` is a ``(batch, num_rows, heads[, head_dim])`` block.
    Never zero-filled: merges read only the rows that hold a result."""

    def __init__(
        self,
        rows: dict[int, BranchRows],
        batch: int,
        heads: int,
        head_dim: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        per_unit = 1 if head_dim is None else head_dim
        tail = (heads,) if head_dim is None else (heads, head_dim)
        units = [batch * br.num_rows * heads for br in rows.values()]
        self.flat = torch.empty(sum(units) * per_unit, dtype=dtype, device=device)
        self.blocks: dict[int, Tensor] = {}
        meta, base = [], 0
        for (branch, br), size in zip(rows.items(), units):
            block = self.flat[base * per_unit : (base + size) * per_unit]
            self.blocks[branch] = block.view(batch, br.num_rows, *tail)
            meta.append((br.segment_length, br.dilation, br.rows_per_segment, base, br.num_rows * heads))
            base += size
        self.meta = tuple(meta)


_BRANCH_META: BoundedCache[Tensor] = BoundedCache(256)


def _branch_meta(meta: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """``meta`` on ``device``, made once per layout (no host-to-device copy per call)."""
    return _BRANCH_META.get((meta, device), lambda: torch.tensor(meta, dtype=torch.int64, device=device))


def _merge_branches(
    out: Tensor,
    lse: Tensor | None,
    rows: dict[int, BranchRows],
    parts: _BranchBuffers,
    part_lse: _BranchBuffers | None,
    heads: range,
) -> None:
    """``out`` ``(batch, seq, heads, head_dim)``, holding ``heads``, from every
    branch's compact results: their lse merge (DESIGN.md §1; also writes the merged
    ``lse``) when lses are given, else their sum (dq, dk, dv)."""
    if triton_merge.can_merge_branches(out, max(br.num_rows for br in rows.values())):
        triton_merge.merge_branches(
            out,
            lse,
            parts.flat,
            None if part_lse is None else part_lse.flat,
            _branch_meta(parts.meta, out.device),
            heads.start,
        )
        return
    b, n, c, _ = out.shape
    acc_dtype = _bias_dtype(out.dtype)
    acc = out.new_zeros(out.shape, dtype=acc_dtype)
    top = None if lse is None else out.new_full((b, n, c), -math.inf, dtype=acc_dtype)
    total = None if lse is None else out.new_zeros((b, n, c), dtype=acc_dtype)
    position = torch.arange(n, device=out.device)[:, None]
    head = torch.arange(heads.start, heads.stop, device=out.device)[None, :]
    for branch, br in rows.items():
        t = position % br.segment_length
        selected = t % br.dilation == head % br.dilation
        index = torch.where(
            selected, position // br.segment_length * br.rows_per_segment + t // br.dilation, 0
        )
        # unselected rows of the buffers were never written: mask what the gather read
        part = parts.blocks[branch][:, index, head - heads.start].masked_fill(~selected[..., None], 0.0)
        if part_lse is None or top is None or total is None:
            acc.add_(part)
            continue
        branch_lse = part_lse.blocks[branch][:, index, head - heads.start].masked_fill(~selected, -math.inf)
        merge_online(acc, top, total, part.to(acc_dtype), branch_lse.to(acc_dtype))
    if top is None or total is None or lse is None:
        out.copy_(acc)
        return
    merged, merged_lse = merge_finish(acc, top, total)
    out.copy_(merged)
    lse.copy_(merged_lse)


# --------------------------------------------------------------------------
# fused path


def _rows_with_keys(bias: Tensor, causal: bool) -> Tensor:
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


def _sanitize(out: Tensor, lse: Tensor, has_key: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with no key: output 0 and lse -inf, whatever the kernel gave."""
    return out.masked_fill(~has_key[..., None], 0.0), lse.masked_fill(~has_key, -math.inf)


class SpanKeys(Protocol):
    """Keys/values of a problem that live on the several ranks sharing a segment,
    in blocks of rows, one per member (sequence parallelism)."""

    index: int  # this rank's place among the members
    counts: list[int]  # selected rows per member, in sequence order


class RemoteKeys(SpanKeys, Protocol):
    """Gathered whole (LongNet's all-gather). Each call starts the communication
    and returns a ``wait`` function, so compute issued before waiting overlaps it."""

    def start_gather(self, local: Tensor) -> Callable[[], Tensor]:
        """This rank's selected rows ``(batch, count, ...)`` -> every member's rows
        ``(batch, total, ...)`` in sequence order."""
        ...

    def start_reduce(self, grad: Tensor) -> Callable[[], Tensor]:
        """Gradient ``(batch, total, ...)`` of the gathered rows -> this rank's rows,
        summed over the members."""
        ...


class RingKeys(SpanKeys, Protocol):
    """Rotated among the members: at step ``t`` this rank holds member
    ``(index - t) % len(counts)``'s rows, so it holds two blocks at a time
    instead of the whole segment's."""

    def start_shift(self, tensors: list[Tensor], member: int, channel: int = 0) -> Callable[[], list[Tensor]]:
        """Send ``tensors`` ``(batch, heads, counts[member], ...)`` (``member``'s rows)
        to the next member; ``wait`` returns the previous member's, of member
        ``member - 1``. Shifts on different channels (0 or 1) may be in flight at once."""
        ...


class Balance(Protocol):
    """Causal work of a spanning segment evened out between members ``j`` and
    ``size - 1 - j``: under causality a later member's queries see more blocks,
    so the later one (the lender) hands its last ``rows`` query rows, from row
    ``first`` on, to the earlier one (the borrower), which computes them and
    sends their results back (zigzag balancing without moving the shards)."""

    lender: bool
    partner: int  # the other member's place among the members
    first: int  # first lent row of the lender's block
    rows: int  # lent rows

    def start_swap(self, outgoing: list[Tensor], incoming: list[Tensor]) -> Callable[[], list[Tensor]]:
        """Send ``outgoing`` to the partner and receive into ``incoming`` (allocated by the caller)."""
        ...


@dataclasses.dataclass
class FusedProblem:
    """One branch problem of the fused path. ``call`` places the queries (and
    the output) in the local sequence; keys and values are the same positions,
    or, with ``remote``/``ring``, the segment's rows on every rank that shares
    it (one segment per problem). Those run block by block, one block per
    member: ``bias`` (key padding only) covers all members' keys, and ``causal``
    means no key of a later member and causal within a member's own block."""

    call: BranchCall
    backend: kernels.Backend
    bias: Tensor | None = None
    causal: bool = False
    remote: RemoteKeys | None = None
    ring: RingKeys | None = None
    balance: Balance | None = None

    @property
    def span(self) -> SpanKeys | None:
        return self.ring if self.ring is not None else self.remote


def _block_columns(span: SpanKeys, members: range) -> slice:
    """Columns of ``members``' rows among all members' (sequence order)."""
    return slice(sum(span.counts[: members.start]), sum(span.counts[: members.stop]))


@dataclasses.dataclass
class _Rows:
    """Query rows ``[first, first + n)`` of ``owner``'s block, with what their
    backward needs once known."""

    owner: int
    first: int
    q: Tensor
    grad_out: Tensor | None = None
    out: Tensor | None = None
    lse: Tensor | None = None


def _pieces(p: FusedProblem, rows: _Rows, members: range) -> list[tuple[slice, Tensor | None, bool]]:
    """``(keys of the block, bias, causal)`` of each kernel call of ``rows`` against
    the block of ``members``' keys: one call without causality; under it, the
    keys up to row ``first`` of ``owner`` in full and the owner's next ``n``
    causally. Causal calls are square, so no kernel's alignment of a
    non-square causal mask matters."""
    span = p.span
    assert span is not None
    n = rows.q.shape[2]
    cols = _block_columns(span, members)
    if n == 0 or (p.causal and rows.owner < members.start):
        return []
    keys = [(slice(0, cols.stop - cols.start), False)]
    if p.causal and rows.owner < members.stop:
        own = _block_columns(span, range(members.start, rows.owner)).stop - cols.start + rows.first
        keys = [(slice(0, own), False)] if own else []
        keys.append((slice(own, own + n), True))
    bias = None if p.bias is None else p.bias[..., cols]
    return [(k, None if bias is None else bias[..., k], causal) for k, causal in keys]


def _accumulate(total: Tensor | None, part: Tensor, dtype: torch.dtype) -> Tensor:
    """``total + part``, in ``dtype`` once there are two terms."""
    if total is None:
        return part
    return total.to(dtype).add_(part)


Blocks = Iterator[tuple[range, Tensor, Tensor]]


def _ring_blocks(ring: RingKeys, k: Tensor, v: Tensor) -> Blocks:
    """``(members, keys, values)``, one member's block at a time as they come
    round; the next block travels while the caller computes on this one."""
    size = len(ring.counts)
    for t in range(size):
        member = (ring.index - t) % size
        wait = ring.start_shift([k, v], member) if t < size - 1 else None
        yield range(member, member + 1), k, v
        if wait is not None:
            k, v = wait()


def _query_rows(p: FusedProblem, q: Tensor) -> list[_Rows]:
    """This rank's rows to compute: its own, less what it lends, plus what it borrows."""
    span, bal = p.span, p.balance
    assert span is not None
    if bal is None:
        return [_Rows(span.index, 0, q)]
    if bal.lender:
        bal.start_swap([q[:, :, bal.first :].contiguous()], [])()
        return [_Rows(span.index, 0, q[:, :, : bal.first])]
    borrowed = q.new_empty(*q.shape[:2], bal.rows, q.shape[3])
    bal.start_swap([], [borrowed])()
    return [_Rows(span.index, 0, q), _Rows(bal.partner, bal.first, borrowed)]


def _blockwise_forward(
    p: FusedProblem, q: Tensor, blocks: Blocks, scale: float
) -> tuple[Tensor, Tensor, dict[Any, Any]]:
    """One problem over keys in blocks, merged by lse in float32. Returns
    ``(out, lse, kernel states)`` of this rank's own query rows."""
    sets = _query_rows(p, q)
    acc_dtype = _bias_dtype(q.dtype)
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(sets)
    # from the second call on, a set's results merge online: (acc, top, total)
    merging: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    states: dict[Any, Any] = {"rows": sets}
    for members, k, v in blocks:
        for s, rows in enumerate(sets):
            for piece, (keys, bias, causal) in enumerate(_pieces(p, rows, members)):
                part_out, part_lse, states[s, members.start, piece] = p.backend.forward(
                    rows.q, k[:, :, keys], v[:, :, keys], bias, causal, scale
                )
                if bias is not None:
                    part_out, part_lse = _sanitize(part_out, part_lse, _rows_with_keys(bias, causal))
                first = results[s]
                if first is None:  # one call (the common case) needs no merge
                    results[s] = part_out, part_lse
                    continue
                if s not in merging:
                    out, lse = first[0].to(acc_dtype), first[1].to(acc_dtype)
                    merging[s] = out.clone(), lse.clone(), (lse > -math.inf).to(acc_dtype)
                merge_online(*merging[s], part_out.to(acc_dtype), part_lse.to(acc_dtype))
    for s, terms in merging.items():
        results[s] = merge_finish(*terms)
    if results[0] is None:  # no key for any row
        results[0] = (
            sets[0].q.new_zeros(sets[0].q.shape),
            sets[0].q.new_full(sets[0].q.shape[:3], -math.inf, dtype=acc_dtype),
        )
    out, lse = results[0]
    bal = p.balance
    if bal is not None and bal.lender:  # the lent rows' results come back, in float32
        shape = (*out.shape[:2], bal.rows)
        incoming = [
            out.new_empty(*shape, out.shape[3], dtype=acc_dtype),
            lse.new_empty(shape, dtype=acc_dtype),
        ]
        lent_out, lent_lse = bal.start_swap([], incoming)()
        out, lse = torch.cat([out.to(acc_dtype), lent_out], 2), torch.cat([lse.to(acc_dtype), lent_lse], 2)
    elif bal is not None:
        assert results[1] is not None  # lent rows always see earlier keys
        bal.start_swap([x.to(acc_dtype).contiguous() for x in results[1]], [])()
    return out, lse, states


@dataclasses.dataclass
class _BlockBackward:
    """What every block's backward shares; ``dq`` sums over the blocks in float32."""

    p: FusedProblem
    rows: list[_Rows]
    scale: float
    states: dict[Any, Any]
    dq: list[Tensor | None]

    @classmethod
    def start(
        cls, p: FusedProblem, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, states: dict[Any, Any]
    ) -> _BlockBackward:
        """Own rows get their gradient, output and lse; lent rows' go to the borrower."""
        # copies: rows holding the output in the node's own state would make a reference cycle
        rows: list[_Rows] = [dataclasses.replace(r) for r in states["rows"]]
        bal = p.balance
        own = slice(0, bal.first) if bal is not None and bal.lender else slice(None)
        rows[0].grad_out, rows[0].out, rows[0].lse = grad_out[:, :, own], out[:, :, own], lse[:, :, own]
        if bal is not None and bal.lender:
            bal.start_swap([x[:, :, bal.first :].contiguous() for x in (grad_out, out, lse)], [])()
        elif bal is not None:
            lent = rows[1]
            shape = (*lent.q.shape[:2], bal.rows)
            lent.grad_out, lent.out, lent.lse = bal.start_swap(
                [], [grad_out.new_empty(*shape, grad_out.shape[3]), out.new_empty(*shape, out.shape[3]),
                     lse.new_empty(shape)],
            )()  # fmt: skip
        return cls(p, rows, scale, states, [None] * len(rows))

    def __call__(self, members: range, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(dk, dv)`` of the block of ``members``' keys, None where no query sees it."""
        acc = _bias_dtype(k.dtype)
        grads: list[Tensor] | None = None
        for s, rows in enumerate(self.rows):
            for piece, (keys, bias, causal) in enumerate(_pieces(self.p, rows, members)):
                dq, dk, dv = self.p.backend.backward(
                    rows.grad_out, rows.q, k[:, :, keys], v[:, :, keys], rows.out, rows.lse,
                    bias, causal, self.scale, self.states[s, members.start, piece],
                )  # fmt: skip
                self.dq[s] = _accumulate(self.dq[s], dq, acc)
                if grads is None and dk.shape == k.shape:  # one call over the whole block
                    grads = [dk, dv]
                    continue
                if grads is None:
                    grads = [k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)]
                elif grads[0].dtype != acc:
                    grads = [x.to(acc) for x in grads]
                grads[0][:, :, keys] += dk
                grads[1][:, :, keys] += dv
        return None if grads is None else (grads[0], grads[1])

    def finish(self) -> Tensor:
        """``dq`` of this rank's rows; the borrower's share of the lent rows comes home."""
        acc = _bias_dtype(self.rows[0].q.dtype)
        dq = [x if x is not None else r.q.new_zeros(r.q.shape) for x, r in zip(self.dq, self.rows)]
        bal = self.p.balance
        if bal is None:
            return dq[0]
        if not bal.lender:
            bal.start_swap([dq[1].to(acc).contiguous()], [])()
            return dq[0]
        (lent,) = bal.start_swap(
            [], [dq[0].new_empty(*dq[0].shape[:2], bal.rows, dq[0].shape[3], dtype=acc)]
        )()
        return torch.cat([dq[0].to(acc), lent], 2)


def _ring_backward(ring: RingKeys, block: _BlockBackward, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The keys rotate again (no other rank's rows were kept); each block's
    key/value gradients travel with it and reach their owner after the last step."""
    incoming: Callable[[], list[Tensor]] | None = None
    for members, k_block, v_block in _ring_blocks(ring, k, v):
        grads = block(members, k_block, v_block)
        received = incoming() if incoming is not None else None  # the earlier members' share
        if grads is None:
            grads = (
                received if received is not None else (torch.zeros_like(k_block), torch.zeros_like(v_block))
            )
        else:  # summed in float32, sent in the input dtype
            if received is not None:
                grads = tuple(_accumulate(g, r, _bias_dtype(k.dtype)) for g, r in zip(grads, received))
            grads = tuple(g.to(k.dtype) for g in grads)
        incoming = ring.start_shift(list(grads), members.start, channel=1)
    assert incoming is not None
    dk, dv = incoming()  # this rank's own rows, summed over every member
    return dk, dv


def _gathered_backward(
    remote: RemoteKeys, block: _BlockBackward, k: Tensor, v: Tensor
) -> Callable[[], Tensor]:
    """The gathered keys' gradients ``(batch, total, 2·heads, d)``, whose reduction
    home is started and returned."""
    grads = block(range(len(remote.counts)), k, v) or (torch.zeros_like(k), torch.zeros_like(v))
    return remote.start_reduce(torch.cat([g.to(k.dtype).transpose(1, 2) for g in grads], 2))


def _stacked_rows(key: Tensor, value: Tensor, call: BranchCall) -> Tensor:
    """This rank's selected keys and values of a one-segment call, ``(batch, count, 2·heads, d)``:
    one message for both."""
    return torch.cat([_strided(key, call)[:, 0], _strided(value, call)[:, 0]], 2)


def _unstack_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_stacked_rows` in problem layout ``(batch, heads, total, d)``."""
    k, v = rows.chunk(2, dim=2)
    return k.transpose(1, 2), v.transpose(1, 2)


def _into_place(p: FusedProblem, x: Tensor, call: BranchCall) -> Tensor | None:
    """``x``'s problem view of ``call`` for a backend to write into, where that is
    exact: a local problem without bias, a backend with ``forward_into``, and a view
    (not a copy) of ``x``. ``x`` must not be shared with another problem's
    (position, head): grouped-head outputs, or one branch's compact buffer."""
    if p.span is not None or p.bias is not None or not hasattr(p.backend, "forward_into"):
        return None
    view = _problem_view(x, call)
    is_view = view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    return view if is_view and p.backend.strides.accepts(view) else None


def _write(grad: Tensor, call: BranchCall, first_head: int, part5: Tensor, merge: bool) -> None:
    view = _strided(grad, call, first_head)
    if merge:
        view.add_(part5)
    else:  # grouped: problems are disjoint in (position, head)
        view.copy_(part5)


def merge_head_chunk(num_heads: int, dtype: torch.dtype, rows_per_position: float | None = None) -> int:
    """Heads per chunk of the "all"-mode backward. A chunk of ``c`` heads keeps, in
    units of one ``(batch, seq, heads, head_dim)`` tensor, every branch's dq, dk, dv
    in compact rows (3·u·c/h, ``u = rows_per_position``: the branches' rows per
    position, about Σ 1/r; 2.0 for LongNet's base pattern) or, without them,
    float32 sums of dq, dk, dv (6·c/h for bf16), one call's dq, dk, dv (3·c/h) and
    the kernel's float32 dq workspace (2·c/h, cuDNN and flash). Keeping that under
    1.6 units holds the forward+backward peak within 1.25× of q, k, v, out and
    their gradients (measured on an H100:
    ``tests/test_gpu.py::test_peak_memory_within_target``); the price is more,
    smaller backward calls. The forward needs no chunks: its compact results
    (``u`` units) are live while no gradient is."""
    if rows_per_position is None:
        rows_per_position = _bias_dtype(dtype).itemsize / dtype.itemsize
    return max(1, int(1.6 * num_heads / (3 * rows_per_position + 5)))


def _backward_pieces(
    problems: Sequence[FusedProblem], num_heads: int, chunk: int
) -> list[tuple[range, list[tuple[int, BranchCall]]]]:
    """Per chunk of ``chunk`` heads: ``(problem index, the part of its call in the
    chunk)``, gathered problems first (their reductions overlap the rest)."""
    chunks: list[tuple[range, list[tuple[int, BranchCall]]]] = [
        (range(s, min(s + chunk, num_heads)), []) for s in range(0, num_heads, chunk)
    ]
    for i in sorted(range(len(problems)), key=lambda i: problems[i].remote is None):
        call = problems[i].call
        for piece in [call] if chunk >= num_heads else split_heads([call], chunk):
            chunks[piece.head_start // chunk][1].append((i, piece))
    return chunks


def _bias_heads(bias: Tensor | None, call: BranchCall, piece: BranchCall) -> Tensor | None:
    """``bias`` of ``call`` restricted to the heads of ``piece`` (a part of it)."""
    if bias is None or bias.shape[1] == 1 or piece.num_heads == call.num_heads:
        return bias
    first = (piece.head_start - call.head_start) // call.head_step
    return bias[:, first : first + piece.num_heads]


class _FusedDilatedAttention(torch.autograd.Function):
    """Grouped heads: problems are disjoint in (position, head); their results
    are copied into place, or written there by an :class:`~.kernels.IntoPlaceBackend`.
    "all": each (position, head) merges one term per branch. Where every problem
    is local, each branch's results go to compact rows (:class:`~.pattern.BranchRows`,
    written into place by such a backend) and one pass merges all branches
    (:func:`_merge_branches`); problems that span ranks merge one at a time into
    float32 sums. The backward goes one chunk of ``head_chunk`` heads at a time
    (kernel states must not depend on the heads; no spanning problem may be cut,
    so pass all heads with those)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        problems: list[FusedProblem],
        merge: bool,
        scale: float,
        head_chunk: int | None,
        recompute: Recompute | None,
    ) -> Tensor:
        b, n, h, d = query.shape
        lse_dtype = _bias_dtype(query.dtype)
        # every problem is a view of the inputs with strides that are multiples of theirs:
        # inputs its kernels take give problems they take, so one check per call
        query, key, value = _conform_inputs(problems, query, key, value)
        local = all(p.span is None for p in problems)
        rows = compact_rows([p.call for p in problems], n, h) if merge and local else None
        if head_chunk is None:
            per_position = None if rows is None else sum(r.num_rows for r in rows.values()) / n
            head_chunk = h if per_position is None else merge_head_chunk(h, query.dtype, per_position)
        if rows is not None:
            parts = _BranchBuffers(rows, b, h, d, query.dtype, query.device)
            part_lses = _BranchBuffers(rows, b, h, None, lse_dtype, query.device)
            out = query.new_empty(b, n, h, d)
            lse = query.new_empty((b, n, h), dtype=lse_dtype)
        else:
            out = query.new_zeros(b, n, h, d, dtype=lse_dtype if merge else query.dtype)
            lse = query.new_full((b, n, h), -math.inf, dtype=lse_dtype)
        # "all" mode one problem at a time: out and lse hold an online merge's acc and top
        total = query.new_zeros((b, n, h), dtype=lse_dtype) if merge and rows is None else None
        # every gather starts first, and its problem runs last: the rest hides it
        gathers = {
            i: p.remote.start_gather(_stacked_rows(key, value, p.call))
            for i, p in enumerate(problems)
            if p.remote is not None
        }
        states: list[Any] = [None] * len(problems)
        remote_kv: list[tuple[Tensor, Tensor] | None] = [None] * len(problems)
        for i in sorted(range(len(problems)), key=lambda i: i in gathers):
            p = problems[i]
            # where the results go: in place, or the branch's compact rows
            to_out, to_lse, to_call = out, lse, p.call
            if rows is not None:
                branch = p.call.branch
                to_out, to_lse = parts.blocks[branch], part_lses.blocks[branch]
                to_call = rows[branch].call_rows(p.call)
            q = _problem_view(query, p.call)
            if p.span is not None:
                if i in gathers:
                    rule = p.backend.strides
                    k, v = remote_kv[i] = tuple(rule.conform(x) for x in _unstack_rows(gathers[i]()))
                    blocks = iter([(range(len(p.span.counts)), k, v)])
                else:
                    assert p.ring is not None
                    k, v = (_problem_view(x, p.call) for x in (key, value))
                    blocks = _ring_blocks(p.ring, k, v)
                # consumed even without local queries: the exchange must still happen
                part_out, part_lse, states[i] = _blockwise_forward(p, q, blocks, scale)
            else:
                if p.call.length == 0:
                    continue
                k, v = (_problem_view(x, p.call) for x in (key, value))
                dest = _into_place(p, to_out, to_call) if rows is not None or not merge else None
                if dest is not None:
                    part_lse, states[i] = p.backend.forward_into(q, k, v, p.causal, scale, dest)  # type: ignore[attr-defined]
                    _strided(to_lse, to_call).copy_(_from_problem(part_lse, b))
                    continue
                part_out, part_lse, states[i] = p.backend.forward(q, k, v, p.bias, p.causal, scale)
                if p.bias is not None:
                    part_out, part_lse = _sanitize(part_out, part_lse, _rows_with_keys(p.bias, p.causal))
            out5, lse4 = _strided(to_out, to_call), _strided(to_lse, to_call)
            part_out, part_lse = _from_problem(part_out, b), _from_problem(part_lse, b)
            if total is not None:
                _merge_into(out5, lse4, _strided(total, to_call), part_out, part_lse)
            else:
                out5.copy_(part_out)
                lse4.copy_(part_lse)
        if rows is not None:
            _merge_branches(out, lse, rows, parts, part_lses, range(h))
        if total is not None:
            out, lse = merge_finish(out, lse, total)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.problems, ctx.states, ctx.remote_kv, ctx.rows = problems, states, remote_kv, rows
        ctx.merge, ctx.scale, ctx.head_chunk, ctx.recompute = merge, scale, head_chunk, recompute
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # grad mode is on in a backward only under create_graph=True (double backward);
        # batched gradients (vmap, is_grads_batched) come as functorch tensors
        if torch.is_grad_enabled() or functorch_active(grad_out):
            return (*_recomputed_grads(ctx, grad_out), None, None, None, None, None)
        query, key, value, out, lse = ctx.saved_tensors
        query, key, value = _conform_inputs(ctx.problems, query, key, value)
        b, n, h, d = query.shape
        grad_out = grad_out.contiguous()
        rows: dict[int, BranchRows] | None = ctx.rows
        new = torch.empty if ctx.merge else torch.zeros
        grads = [new(query.shape, dtype=query.dtype, device=query.device) for _ in range(3)]
        problems: list[FusedProblem] = ctx.problems
        for heads, pieces in _backward_pieces(problems, h, ctx.head_chunk):
            # "all": each branch's gradients go to compact rows and are summed at
            # the end of the chunk, or, with spanning problems, summed in float32
            compact = (
                [_BranchBuffers(rows, b, len(heads), d, query.dtype, query.device) for _ in grads]
                if rows is not None
                else []
            )
            accs = grads
            if ctx.merge and rows is None:
                accs = [query.new_zeros(b, n, len(heads), d, dtype=lse.dtype) for _ in grads]
            reductions: dict[int, Callable[[], Tensor]] = {}
            for i, call in pieces:
                p, kv = problems[i], ctx.remote_kv[i]
                if p.span is None and call.length == 0:
                    continue
                q, o, do = (_problem_view(x, call) for x in (query, out, grad_out))
                k, v = kv if kv is not None else (_problem_view(x, call) for x in (key, value))
                part_lse = _problem_view(lse, call)
                bias = _bias_heads(p.bias, p.call, call)
                if bias is not None:
                    # no key in any branch: every key is masked, so any finite lse gives p = 0
                    part_lse = torch.where(part_lse == -math.inf, 0.0, part_lse)
                if rows is not None:
                    to_call = rows[call.branch].call_rows(call, heads.start)
                    dests = [_into_place(p, c.blocks[call.branch], to_call) for c in compact]
                else:
                    dests = [None if ctx.merge else _into_place(p, grad, call) for grad in grads]
                if p.span is None and all(x is not None for x in dests):
                    p.backend.backward_into(  # type: ignore[attr-defined]
                        do, q, k, v, o, part_lse, p.causal, ctx.scale, ctx.states[i], tuple(dests)
                    )
                    continue
                if p.span is None:
                    part_grads = p.backend.backward(
                        do, q, k, v, o, part_lse, bias, p.causal, ctx.scale, ctx.states[i]
                    )
                else:
                    block = _BlockBackward.start(p, do, o, part_lse, ctx.scale, ctx.states[i])
                    if p.remote is not None:  # dk, dv of gathered keys go home while the rest runs
                        reductions[i] = _gathered_backward(p.remote, block, k, v)
                        part_grads = (block.finish(),)
                    else:
                        assert p.ring is not None
                        dk, dv = _ring_backward(p.ring, block, k, v)
                        part_grads = (block.finish(), dk, dv)
                if rows is not None:
                    for c, part in zip(compact, part_grads):
                        _strided(c.blocks[call.branch], to_call).copy_(_from_problem(part, b))
                    continue
                for acc, part in zip(accs, part_grads):
                    _write(acc, call, heads.start, _from_problem(part, b), ctx.merge)
            for i, wait in reductions.items():
                for acc, part in zip(accs[1:], wait().chunk(2, dim=2)):
                    _write(acc, problems[i].call, heads.start, part[:, None], ctx.merge)
            if rows is not None:
                for grad, c in zip(grads, compact):
                    _merge_branches(grad[:, :, heads.start : heads.stop], None, rows, c, None, heads)
            elif ctx.merge:
                for grad, acc in zip(grads, accs):
                    grad[:, :, heads.start : heads.stop].copy_(acc)
        dq, dk, dv = grads
        return dq, dk, dv, None, None, None, None, None


def _conform_inputs(problems: Sequence[FusedProblem], *inputs: Tensor) -> tuple[Tensor, ...]:
    """``inputs`` in a layout every problem's backend takes (a copy only where one refuses)."""
    rule = kernels.StrideRule.strictest(p.backend.strides for p in problems)
    return tuple(rule.conform(x) for x in inputs)


#: ``(query, key, value) -> output`` of the same function in differentiable torch ops
Recompute = Callable[[Tensor, Tensor, Tensor], Tensor]


def functorch_active(*tensors: Tensor) -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, batched gradients)
    is running or wraps one of ``tensors``: the fused path's in-place strided
    writes have no batching rule, so such calls take the differentiable path."""
    if torch._C._are_functorch_transforms_active():
        return True
    functorch = torch._C._functorch
    # is_grads_batched runs the backward under the legacy vmap, whose tensors are not "wrapped"
    return any(
        functorch.is_functorch_wrapped_tensor(x) or functorch.is_legacy_batchedtensor(x) for x in tensors
    )


def _recomputed_grads(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dq, dk, dv)`` by differentiating the same function recomputed in plain
    torch ops: exact, and itself differentiable (double backward, gradient
    penalties) and batchable (``is_grads_batched``, ``torch.func``)."""
    if ctx.recompute is None:
        raise RuntimeError(
            "double backward (create_graph=True) and batched gradients are not supported through "
            "sequence-parallel dilated attention: its keys come from other ranks. Compute such "
            "gradients on one device (ImprovedDilatedAttention or DilatedAttention)"
        )
    saved = ctx.saved_tensors[:3]
    needed = ctx.needs_input_grad[:3]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # under create_graph the saved inputs carry their history: the gradients stay
        # functions of them; otherwise fresh leaves suffice
        inputs = [x if create_graph and x.requires_grad else x.detach().requires_grad_(need)
                  for x, need in zip(saved, needed)]  # fmt: skip
        out = ctx.recompute(*inputs)
        wanted = [x for x, need in zip(inputs, needed) if need]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph, allow_unused=True))
    result = [next(found) if need else None for need in needed]
    return tuple(  # type: ignore[return-value]
        g if g is not None or not need else torch.zeros_like(x) for g, x, need in zip(result, saved, needed)
    )


def select_backends(
    query: Tensor, calls: Sequence[BranchCall], has_bias: Sequence[bool], backend: str | None
) -> list[kernels.Backend]:
    """A kernel per problem. A named backend must suit the inputs; a problem whose
    length it refuses (cuDNN at length 1, say) goes to the best one that takes it."""
    spec = kernels.AttentionSpec.from_tensor(query, has_bias=any(has_bias))
    if backend is not None:
        kernels.select_backend(spec, backend)
    named = kernels.REGISTRY.get(backend) if backend is not None else None
    # problems share few (length, bias) pairs: judge each pair once
    by_spec: dict[tuple[bool, int], kernels.Backend] = {}
    chosen = []
    for call, bias in zip(calls, has_bias):
        key = (bias, call.length)
        if key not in by_spec:
            call_spec = dataclasses.replace(spec, has_bias=bias, seq_len=call.length)
            if named is not None and not named.not_supported_reasons(call_spec):
                by_spec[key] = named
            else:
                by_spec[key] = kernels.select_backend(call_spec)
        chosen.append(by_spec[key])
    return chosen


@torch.compiler.disable
def run_fused(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    problems: list[FusedProblem],
    merge: bool,
    scale: float,
    head_chunk: int | None = None,
    recompute: Recompute | None = None,
) -> Tensor:
    """The fused path, kept out of ``torch.compile`` graphs: compiling through the
    custom Function's in-place view writes gave wrong gradients on torch 2.11.
    ``head_chunk``: heads per backward chunk in "all" mode; by default
    :func:`merge_head_chunk` where the branches merge from compact rows, else all
    heads (problems that span ranks must not be cut). ``recompute``: the same
    function in differentiable ops, which double backward and batched gradients
    differentiate (None: they raise)."""
    return _FusedDilatedAttention.apply(query, key, value, problems, merge, scale, head_chunk, recompute)


def _fused(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    backend: str | None,
) -> Tensor:
    b, n, h, _ = query.shape
    merge = pattern.head_mode == "all"
    calls = pattern.calls(n, h)

    def recompute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        problems = _local_problems(q, k, v, key_bias, attn_bias, calls, is_causal)
        return run_gathered(q, problems, pattern, scale, 0.0)

    if functorch_active(query, key, value):
        return recompute(query, key, value)
    biases = [_call_bias(c, key_bias, attn_bias, b) for c in calls]
    backends = select_backends(query, calls, [x is not None for x in biases], backend)
    problems = [FusedProblem(c, be, bias, is_causal) for c, be, bias in zip(calls, backends, biases)]
    return run_fused(query, key, value, problems, merge, scale, recompute=recompute)


# --------------------------------------------------------------------------
# block-sparse path (FlexAttention)


_ONE_BLOCK: BoundedCache[Tensor] = BoundedCache(16)


def _one_block(device: torch.device) -> Tensor:
    """A one-block layout per device: one tensor, so its block masks stay cached."""
    return _ONE_BLOCK.get(device, lambda: torch.ones(1, 1, dtype=torch.bool, device=device))


@dataclasses.dataclass
class FlexProblem:
    """One branch problem for FlexAttention: rows ``call`` of the local sequence;
    ``q`` ``(batch·segments, heads, len_q, d)``, ``k``/``v`` ``(batch·segments, heads,
    len_k, d)``; ``mask`` None for a problem without queries or keys, which runs
    in plain torch (it must still be in the autograd graph: its keys may have
    come from other ranks, which wait for their gradients)."""

    call: BranchCall
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Any
    score_mod: Callable[..., Tensor] | None = None


def check_flex(query: Tensor, key: Tensor, value: Tensor, attn_masked: bool = False) -> None:
    """Raise if ``method="flex"`` cannot run this call."""
    requires_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    reasons = flex_kernel.not_supported_reasons(query.device.type, requires_grad, attn_masked=attn_masked)
    if reasons:
        raise ValueError(f"method='flex' cannot run this call: {'; '.join(reasons)}; use method='gather'")


def run_flex(query: Tensor, problems: Iterable[FlexProblem], pattern: DilatedPattern, scale: float) -> Tensor:
    """Each problem through FlexAttention under autograd, outputs copied into
    place (grouped) or merged by lse ("all", differentiating through the lse)."""
    b, n, h, d = query.shape
    if pattern.head_mode == "all":
        # one buffer per branch, merged by lse at the end
        outs = [query.new_zeros(b, n, h, d) for _ in range(pattern.num_branches)]
        lses = [query.new_full((b, n, h), -math.inf, dtype=_bias_dtype(query.dtype)) for _ in outs]
        for p in problems:
            part_out, part_lse = _flex_problem(p, scale, lse=True)
            _strided(outs[p.call.branch], p.call).copy_(_from_problem(part_out.to(query.dtype), b))
            _strided(lses[p.call.branch], p.call).copy_(_from_problem(part_lse, b))
        return merge_by_lse(outs, lses)[0].to(query.dtype)
    # grouped: calls are disjoint in (position, head), so one buffer takes them all
    out = None
    for p in problems:
        part_out = _from_problem(_flex_problem(p, scale, lse=False)[0].to(query.dtype), b)
        if out is None and _covers(p.call, n, h):
            return part_out.reshape(b, n, h, d)  # the only call: its output is the output
        if out is None:
            out = query.new_zeros(b, n, h, d)
        _strided(out, p.call).copy_(part_out)
    return out if out is not None else query.new_zeros(b, n, h, d)


def _flex_problem(p: FlexProblem, scale: float, lse: bool) -> tuple[Tensor, Tensor | None]:
    if p.mask is None:
        return math_kernel.attention_lse(p.q, p.k, p.v, None, False, scale, 0.0)
    return flex_kernel.attention(p.q, p.k, p.v, p.mask, p.score_mod, scale, lse)


def _covers(call: BranchCall, seq_len: int, num_heads: int) -> bool:
    """Whether a call's problem is every (position, head) in order (dilation 1, whole
    segments from 0, all heads): a view of its output is the whole output."""
    return (
        call.dilation == 1
        and call.start == 0
        and call.length == call.segment_length
        and call.num_segments * call.segment_length == seq_len
        and (call.head_start, call.head_step, call.num_heads) == (0, 1, num_heads)
    )


def _flex(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    layout: BlockLayout,
    is_causal: bool,
    scale: float,
) -> Tensor:
    """Each branch problem through FlexAttention, its strided views as inputs and
    a block mask built from the layout (cached per layout and geometry)."""
    check_flex(query, key, value, attn_bias is not None)
    return run_flex(
        query,
        flex_problems(
            query, key, value, key_bias, attn_bias, pattern.calls(*query.shape[1:3]), layout, is_causal
        ),
        pattern,
        scale,
    )


def flex_problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    calls: Sequence[BranchCall],
    layout: BlockLayout,
    is_causal: bool,
) -> Iterator[FlexProblem]:
    """Each call on strided views with its block mask (cached unless masks are given)."""
    b = query.shape[0]
    masked = key_bias is not None or attn_bias is not None
    for call in calls:

        def build(call: BranchCall = call) -> Any:
            return flex_kernel.block_mask(
                call, layout.blocks, layout.block_size, is_causal, b, key_bias, attn_bias, layout.offset
            )

        cache_key = (call, layout.block_size, is_causal, b, layout.offset)
        mask, score_mod = build() if masked else flex_kernel.CACHE.get(layout.cache_owner, cache_key, build)
        q, k, v = (flex_kernel.STRIDES.conform(_problem_view(x, call)) for x in (query, key, value))
        yield FlexProblem(call, q, k, v, mask, score_mod)


# --------------------------------------------------------------------------
# gather path


@dataclasses.dataclass
class GatheredProblem:
    """One branch problem as copies: queries at ``positions`` of the local
    sequence, heads ``call.heads()``; ``q`` ``(batch·segments, heads, len_q, d)``,
    ``k``/``v`` ``(batch·segments, heads, len_k, d)`` (keys may come from other
    ranks), ``bias`` additive and broadcastable to the scores."""

    call: BranchCall
    positions: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    causal: bool


def _local_problems(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    calls: Sequence[BranchCall],
    is_causal: bool,
    layout: BlockLayout | None = None,
) -> Iterator[GatheredProblem]:
    """Copy-gather each call's queries, keys and values from this sequence."""
    b, _, _, d = query.shape
    for call in calls:
        positions = _positions(call, query.device)
        s, m = positions.shape
        flat = positions.reshape(-1, 1)
        heads = torch.tensor(call.heads(), device=query.device)[None, :]
        q, k, v = (
            x[:, flat, heads].reshape(b * s, m, call.num_heads, d).transpose(1, 2)
            for x in (query, key, value)
        )
        bias = _call_bias(call, key_bias, attn_bias, b, positions, layout)
        yield GatheredProblem(call, positions.reshape(-1), q, k, v, bias, is_causal)


def run_gathered(
    query: Tensor,
    problems: Iterable[GatheredProblem],
    pattern: DilatedPattern,
    scale: float,
    dropout_p: float,
    sdpa: bool = False,
) -> Tensor:
    """Attention of every problem under autograd, scattered into a ``query``-shaped
    output; "all"-mode branches merge by lse. Plain torch, or with ``sdpa`` and
    where no lse and no mask is needed (grouped heads), PyTorch's fused SDPA
    kernels, which also do dropout without O(length²) memory."""
    b, n, h, d = query.shape
    merge = pattern.head_mode == "all"
    lse_dtype = _bias_dtype(query.dtype)
    k = pattern.num_branches
    out = query.new_zeros(b, n, h, d)
    branch_outs = [query.new_zeros(b, n, h, d) for _ in range(k)] if merge else []
    branch_lses = [query.new_full((b, n, h), -math.inf, dtype=lse_dtype) for _ in range(k)] if merge else []
    for p in problems:
        if sdpa and not merge and p.bias is None:
            part_out = F.scaled_dot_product_attention(
                p.q, p.k, p.v, dropout_p=dropout_p, is_causal=p.causal, scale=scale
            )
        else:
            part_out, part_lse = math_kernel.attention_lse(p.q, p.k, p.v, p.bias, p.causal, scale, dropout_p)
        heads = torch.tensor(p.call.heads(), device=query.device)[None, :]
        index = (p.positions[:, None], heads)
        part_out = part_out.transpose(1, 2).reshape(b, -1, p.call.num_heads, d)
        if merge:
            branch_outs[p.call.branch][:, index[0], index[1]] = part_out
            part_lse = part_lse.transpose(1, 2).reshape(b, -1, p.call.num_heads)
            branch_lses[p.call.branch][:, index[0], index[1]] = part_lse.to(lse_dtype)
        else:
            out[:, index[0], index[1]] = part_out
    if merge:
        out = merge_by_lse(branch_outs, branch_lses)[0].to(query.dtype)
    return out


# --------------------------------------------------------------------------
# public entry point


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
) -> Tensor:
    """Dilated attention (DESIGN.md §1) of ``(batch, seq, heads, head_dim)`` inputs.

    Args:
        segment_lengths, dilation_rates, head_mode: the pattern, or a ready
            :class:`DilatedPattern` as ``segment_lengths``.
        is_causal: a query sees only keys at positions <= its own.
        key_padding_mask: ``(batch, seq)``; bool True = ignore that key, or float (added).
        attn_mask: ``(seq, seq)`` or ``(batch | 1, heads | 1, seq, seq)``; bool
            True = not allowed (the ``nn.MultiheadAttention`` convention), or
            float (added to the scores). Applied on top of the pattern.
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
            Runs with ``method="flex"`` or ``"gather"``.
        block_size: positions per block of ``block_layout``.

    Returns:
        ``(batch, seq, heads, head_dim)``; a (position, head) with no key is 0.
    """
    refuse_torchscript()
    pattern = as_pattern(segment_lengths, dilation_rates, head_mode)
    shape, key_bias, attn_bias, scale = validate_call(
        query, key, value, is_causal, key_padding_mask, attn_mask, dropout_p, softmax_scale, method
    )
    layout = None
    if block_layout is not None:
        layout = prepare_layout(block_layout, block_size, shape, query.dtype, query.device)
        if method == "fused":
            raise ValueError(
                "block_layout runs with method='flex' (FlexAttention) or method='gather', not 'fused'"
            )
    if method == "flex" and functorch_active(query, key, value):
        method = "gather"  # the same function in ops torch.func can transform
    if method == "flex":
        if dropout_p > 0.0:
            raise ValueError(
                "method='flex' has no dropout (FlexAttention); use method='gather' for dropout_p > 0"
            )
        if layout is None:  # one block: every pair the pattern allows
            layout = prepare_layout(_one_block(query.device), shape[1], shape, query.dtype, query.device)
        return _flex(query, key, value, key_bias, attn_bias, pattern, layout, is_causal, scale)
    if method == "gather" or dropout_p > 0.0:
        calls = pattern.calls(shape[1], shape[2])
        problems = _local_problems(query, key, value, key_bias, attn_bias, calls, is_causal, layout)
        return run_gathered(
            query, problems, pattern, scale, dropout_p, sdpa=method == "fused" and layout is None
        )
    return _fused(query, key, value, key_bias, attn_bias, pattern, is_causal, scale, backend)
