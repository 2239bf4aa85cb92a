"""The gather path: each branch problem copy-gathered, plain torch attention (or
SDPA) under autograd, scattered back; readable, dropout, any mask, double backward."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import accumulation_dtype
from ..kernels import math as math_kernel
from ..pattern import BranchCall, DilatedPattern, kv_head
from ..sparse.block_layout import BlockLayout
from .bias import call_bias
from .merge import merge_by_lse
from .views import positions


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


def local_problems(
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
    b, _, h, _ = query.shape
    for call in calls:
        call_positions = positions(call, query.device)
        s, m = call_positions.shape
        flat = call_positions.reshape(-1, 1)
        heads = torch.tensor(call.heads(), device=query.device)[None, :]
        # grouped-query attention: each query head gathers the key/value head it reads
        kv = torch.tensor([kv_head(j, h, key.shape[2]) for j in call.heads()], device=query.device)[None, :]
        q, k, v = (
            x[:, flat, index].reshape(b * s, m, call.num_heads, x.shape[3]).transpose(1, 2)
            for x, index in ((query, heads), (key, kv), (value, kv))
        )
        bias = call_bias(call, key_bias, attn_bias, b, call_positions, layout)
        yield GatheredProblem(call, call_positions.reshape(-1), q, k, v, bias, is_causal)


def run_gathered(
    query: Tensor,
    problems: Iterable[GatheredProblem],
    pattern: DilatedPattern,
    scale: float,
    dropout_p: float,
    sdpa: bool = False,
    return_lse: bool = False,
    value_head_dim: int | None = None,
) -> Any:
    """Attention of every problem under autograd, scattered into a ``(batch, seq,
    heads, value_head_dim)`` output (``value_head_dim`` defaults to the query's);
    "all"-mode branches merge by lse. Plain torch, or with ``sdpa`` and
    where no lse and no mask is needed (grouped heads), PyTorch's fused SDPA
    kernels, which also do dropout without O(length²) memory. With
    ``return_lse``: ``(out, lse)``, the merged lse ``(batch, seq, heads)``
    (float32; -inf where no key), differentiable."""
    b, n, h, _ = query.shape
    d = query.shape[3] if value_head_dim is None else value_head_dim
    merge = pattern.merges_branches
    lse_dtype = accumulation_dtype(query.dtype)
    k = pattern.num_branches
    out = query.new_zeros(b, n, h, d)
    lse = query.new_full((b, n, h), -math.inf, dtype=lse_dtype) if return_lse and not merge else None
    branch_outs = [query.new_zeros(b, n, h, d) for _ in range(k)] if merge else []
    branch_lses = [query.new_full((b, n, h), -math.inf, dtype=lse_dtype) for _ in range(k)] if merge else []
    for p in problems:
        if sdpa and not merge and p.bias is None and not return_lse:
            part_out = F.scaled_dot_product_attention(
                p.q, p.k, p.v, dropout_p=dropout_p, is_causal=p.causal, scale=scale
            )
        else:
            part_out, part_lse = math_kernel.attention_lse(p.q, p.k, p.v, p.bias, p.causal, scale, dropout_p)
        heads = torch.tensor(p.call.heads(), device=query.device)[None, :]
        index = (p.positions[:, None], heads)
        part_out = part_out.transpose(1, 2).reshape(b, -1, p.call.num_heads, d)
        if merge or lse is not None:
            part_lse = part_lse.transpose(1, 2).reshape(b, -1, p.call.num_heads).to(lse_dtype)
        if merge:
            branch_outs[p.call.branch][:, index[0], index[1]] = part_out
            branch_lses[p.call.branch][:, index[0], index[1]] = part_lse
        else:
            out[:, index[0], index[1]] = part_out
            if lse is not None:
                lse[:, index[0], index[1]] = part_lse
    if merge:
        out, lse = merge_by_lse(branch_outs, branch_lses)
        out = out.to(query.dtype)
    return (out, lse) if return_lse else out


def gathered_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_bias: Tensor | None,
    attn_bias: Tensor | None,
    pattern: DilatedPattern,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    layout: BlockLayout | None = None,
    sdpa: bool = False,
    return_lse: bool = False,
) -> Any:
    """The gather path of one sequence: every call of the pattern gathered
    (:func:`local_problems`) and run (:func:`run_gathered`)."""
    calls = pattern.calls(query.shape[1], query.shape[2])
    problems = local_problems(query, key, value, key_bias, attn_bias, calls, is_causal, layout)
    # SDPA's fused kernels take one head_dim for q, k and v
    sdpa = sdpa and value.shape[3] == query.shape[3]
    return run_gathered(
        query, problems, pattern, scale, dropout_p, sdpa=sdpa, return_lse=return_lse,
        value_head_dim=value.shape[3],
    )  # fmt: skip
