"""xFormers' memory-efficient attention (``xformers.ops.fmha``), when installed.

Optional: nothing imports xformers unless this backend is asked about a CUDA
call. It goes through xformers' public API only
(``memory_efficient_attention_forward_requires_grad`` returns the log-sum-exp,
``memory_efficient_attention_backward`` takes any output and lse, which is the
ring-attention identity the branch merge needs), and xformers' dispatcher picks
the kernel: FlashAttention-3 where the ``flash_attn_3`` package is installed on
sm90, FlashAttention-2 (the ``flash_attn`` package, else PyTorch's own copy of
it), else CUTLASS (PyTorch's memory-efficient kernel; float32 lands here).

Inputs are ``(batch, seq, heads, head_dim)`` for xformers, so a branch problem
``(batch, heads, len, head_dim)`` goes in transposed, without a copy.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .base import AttentionSpec, KernelBackend, StrideRule, distribution_version

#: releases this module ran against on a GPU (H100, torch 2.11, tests/test_gpu.py);
#: the API it calls is public, so other releases are not refused
TESTED_VERSIONS: tuple[str, ...] = ("0.0.35",)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def installed_version() -> str | None:
    return distribution_version("xformers", "xformers")


@functools.cache
def import_error() -> str | None:
    """Why ``xformers.ops.fmha`` does not import, or None. Cached: importing is slow
    and the installed package does not change."""
    try:
        _fmha()
    except Exception as exc:  # any failure (a torch mismatch, a missing symbol) means it cannot run
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _extension_loaded() -> bool:
    """What xformers' own operators check before running on CUDA (read each time: a
    module global, cheap, and tests set it)."""
    from xformers.ops.fmha import common

    return bool(getattr(common, "_built_with_cuda", True)) or torch.version.hip is not None


def _fmha() -> Any:
    from xformers.ops import fmha

    return fmha


class XformersBackend(KernelBackend):
    name = "xformers"
    description = (
        "xFormers' memory_efficient_attention when installed (its dispatcher picks "
        "FlashAttention-3/-2 or CUTLASS); public API, inputs passed as strided views"
    )

    strides = StrideRule(last_dim_contiguous=True, alignment=16)

    SUPPORTED_DTYPES = _DTYPES
    MIN_COMPUTE_CAPABILITY = (8, 0)
    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 128
    SUPPORTS_BIAS = False

    # a public API: releases other than TESTED_VERSIONS are taken
    PACKAGE, EXTRA = "xformers", "xformers"

    def package_version(self) -> str | None:
        return installed_version()

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        # imported only where it could run (importing xformers is slow)
        if reasons or not torch.cuda.is_available():
            return []
        error = import_error()
        if error is not None:
            return [f"xformers.ops.fmha does not import: {error}"]
        if not _extension_loaded():
            return [
                "xformers' C++/CUDA extension did not load (built for another torch or CUDA), "
                "so its operators refuse CUDA inputs"
            ]
        return []

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float):
        fmha = _fmha()
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(
            *(x.transpose(1, 2) for x in (q, k, v)), attn_bias=_causal_bias(fmha, causal), scale=scale
        )
        # CUTLASS pads the lse to a multiple of 32 rows; the backward accepts it unpadded
        return out.transpose(1, 2), lse[..., : q.shape[2]], None

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        fmha = _fmha()
        dq, dk, dv = fmha.memory_efficient_attention_backward(
            grad_out.transpose(1, 2),
            out.transpose(1, 2),
            lse.contiguous(),
            *(x.transpose(1, 2) for x in (q, k, v)),
            attn_bias=_causal_bias(fmha, causal),
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _causal_bias(fmha: Any, causal: bool) -> Any:
    # top-left aligned like SDPA's is_causal; the callers' causal problems are square
    return fmha.attn_bias.LowerTriangularMask() if causal else None
