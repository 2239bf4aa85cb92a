"""Block-sparse dilated attention on FlexAttention: each branch problem on its
strided views with a block mask, differentiated by autograd (FlexAttention has
no backward that takes a merged output and lse, so it is not a kernel backend)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from ..core.merge import merge_by_lse
from ..core.views import from_problem, problem_view, strided
from ..kernels import math as math_kernel
from ..kernels.base import StrideRule
from ..pattern import BranchCall, DilatedPattern, kv_call, split_for_kv
from .block_layout import BlockLayout
from .block_mask import CACHE, TILE, block_mask, flex_module

#: layouts its Triton kernels are given (others are copied first)
STRIDES = StrideRule(last_dim_contiguous=True, alignment=16)


_RECOMPILE_LIMIT = 64


def not_supported_reasons(
    device_type: str,
    requires_grad: bool,
    compute_capability: tuple[int, int] | None = None,
    triton_available: bool | None = None,
    attn_masked: bool = False,
) -> list[str]:
    """Why the FlexAttention path cannot run (empty: it can). ``attn_masked``: a
    ``(seq, seq)`` ``attn_mask`` is given."""
    reasons = []
    if flex_module is None:
        reasons.append("torch.nn.attention.flex_attention is missing (needs torch >= 2.5)")
    if device_type == "cuda":
        if compute_capability is not None and compute_capability < (8, 0):
            reasons.append(f"needs compute capability >= 8.0, got {compute_capability}")
        if triton_available is None:
            triton_available = _has_triton()
        if not triton_available:
            reasons.append("Triton is not installed (FlexAttention compiles Triton kernels)")
        if attn_masked:  # measured on the H100 with torch 2.11 (docs/implementations.md)
            reasons.append(
                "attn_mask: the FlexAttention kernel reading a (seq, seq) mask in mask_mod found no "
                "Triton config within the GPU's shared memory"
            )
    elif device_type == "cpu":
        if requires_grad:
            reasons.append("FlexAttention on CPU is forward-only (inputs require grad)")
    else:
        reasons.append(f"runs on cuda and (forward only) cpu, got {device_type}")
    return reasons


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_compiled: Callable[..., Any] | None = None


def _flex_attention(device_type: str) -> Callable[..., Any]:
    """Compiled FlexAttention on CUDA (eager FlexAttention materialises the scores)."""
    global _compiled
    if device_type != "cuda":
        return flex_module.flex_attention
    if _compiled is None:
        # automatic dynamic shapes: the first problem shape compiles static, the
        # second recompiles with dynamic lengths, which then serves every branch
        _compiled = torch.compile(flex_module.flex_attention)
    return _compiled


def _kernel_options(q_len: int, kv_len: int) -> dict[str, Any]:
    """Options of the compiled kernels: lengths that are whole tiles say so. Past
    the first shape the kernel is compiled for dynamic lengths, where inductor
    cannot prove divisibility and masks every load and score at the edges
    (``IS_DIVISIBLE=False``)."""
    return {"IS_DIVISIBLE": q_len % TILE == 0 and kv_len % TILE == 0}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Any,
    score_mod: Callable[..., Tensor] | None,
    scale: float,
    lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(out, lse)`` of ``(batch, heads, len, head_dim)`` problems; lse float32
    ``(batch, heads, len)``, differentiable (None unless ``lse``). Rows with no
    key: out 0 (FlexAttention's own result), lse -inf."""
    fn = _flex_attention(q.device.type)
    if not torch.is_grad_enabled():  # FlexAttention refuses inputs that require grad on CPU, even then
        q, k, v = q.detach(), k.detach(), v.detach()
    kwargs: dict[str, Any] = {"score_mod": score_mod, "block_mask": mask, "scale": scale}
    if k.shape[1] != q.shape[1]:  # grouped-query attention, FlexAttention's own
        kwargs["enable_gqa"] = True
    if q.device.type == "cuda":
        kwargs["kernel_options"] = _kernel_options(q.shape[-2], k.shape[-2])
    # causal or not, masks or not, dtypes, layouts per head: each a compiled variant;
    # past dynamo's default limit of 8 FlexAttention would silently run unfused
    limit = max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit):
        if not lse:
            return fn(q, k, v, **kwargs), None
        if hasattr(flex_module, "AuxRequest"):  # torch >= 2.9
            out, aux = fn(q, k, v, **kwargs, return_aux=flex_module.AuxRequest(lse=True))
            row_lse = aux.lse
        else:
            out, row_lse = fn(q, k, v, **kwargs, return_lse=True)
    has_key = torch.isfinite(row_lse)
    out = torch.where(has_key[..., None], out, 0.0)
    return out, torch.where(has_key, row_lse, -math.inf)


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
    reasons = not_supported_reasons(query.device.type, requires_grad, attn_masked=attn_masked)
    if reasons:
        raise ValueError(f"method='flex' cannot run this call: {'; '.join(reasons)}; use method='gather'")


def run_flex(query: Tensor, problems: Iterable[FlexProblem], pattern: DilatedPattern, scale: float) -> Tensor:
    """Each problem through FlexAttention under autograd, outputs copied into
    place (grouped) or merged by lse ("all", differentiating through the lse)."""
    b, n, h, d = query.shape
    if pattern.merges_branches:
        # one buffer per branch, merged by lse at the end
        outs = [query.new_zeros(b, n, h, d) for _ in range(pattern.num_branches)]
        lses = [query.new_full((b, n, h), -math.inf, dtype=accumulation_dtype(query.dtype)) for _ in outs]
        for p in problems:
            part_out, part_lse = _flex_problem(p, scale, lse=True)
            assert part_lse is not None
            strided(outs[p.call.branch], p.call).copy_(from_problem(part_out.to(query.dtype), b))
            strided(lses[p.call.branch], p.call).copy_(from_problem(part_lse, b))
        return merge_by_lse(outs, lses)[0].to(query.dtype)
    # grouped: calls are disjoint in (position, head), so one buffer takes them all
    out = None
    for p in problems:
        part_out = from_problem(_flex_problem(p, scale, lse=False)[0].to(query.dtype), b)
        if out is None and _covers(p.call, n, h):
            return part_out.reshape(b, n, h, d)  # the only call: its output is the output
        if out is None:
            out = query.new_zeros(b, n, h, d)
        strided(out, p.call).copy_(part_out)
    return out if out is not None else query.new_zeros(b, n, h, d)


def _flex_problem(p: FlexProblem, scale: float, lse: bool) -> tuple[Tensor, Tensor | None]:
    if p.mask is None:
        return math_kernel.attention_lse(p.q, p.k, p.v, None, False, scale, 0.0)
    return attention(p.q, p.k, p.v, p.mask, p.score_mod, scale, lse)


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


def flex_path(
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
            query,
            key,
            value,
            key_bias,
            attn_bias,
            split_for_kv(pattern.calls(*query.shape[1:3]), query.shape[2], key.shape[2]),
            layout,
            is_causal,
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
            return block_mask(
                call, layout.blocks, layout.block_size, is_causal, b, key_bias, attn_bias, layout.offset
            )

        cache_key = (call, layout.block_size, is_causal, b, layout.offset)
        mask, score_mod = build() if masked else CACHE.get(layout.cache_owner, cache_key, build)
        kv = kv_call(call, query.shape[2], key.shape[2])[0]
        q = STRIDES.conform(problem_view(query, call))
        k, v = (STRIDES.conform(problem_view(x, kv)) for x in (key, value))
        yield FlexProblem(call, q, k, v, mask, score_mod)
