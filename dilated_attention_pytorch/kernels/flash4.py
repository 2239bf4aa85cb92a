"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL kernels), when installed.

Optional: nothing imports it unless the backend is asked to run. Its kernels
take ``(batch, seq, heads, head_dim)`` views with any aligned strides, so a
branch problem ``(batch, heads, len, head_dim)`` goes in transposed, without a
copy. It returns the log-sum-exp (float32, ``(batch, heads, len)``) and has a
backward that takes the merged output and lse. ``_flash_attn_fwd`` and
``_flash_attn_bwd`` are private functions of ``flash_attn.cute.interface``:
this module is the one place that calls them, and ``TESTED_VERSIONS`` says
which releases it was checked against on a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

from .base import AttentionSpec, DestinationKernelBackend, StrideRule, distribution_version

#: releases whose private entry points this module was run against (H100 and H200, torch 2.11)
TESTED_VERSIONS: tuple[str, ...] = ("4.0.0b36",)


@functools.cache
def installed_version() -> str | None:
    return distribution_version("flash_attn", "flash-attn-4")


def _interface() -> Any:
    from flash_attn.cute import interface

    return interface


class Flash4Backend(DestinationKernelBackend):
    name = "flash_attn_4"
    description = (
        "FlashAttention-4 (flash-attn-4, CuTe DSL) when installed, on sm90; writes outputs and "
        "gradients of grouped-head problems straight into place"
    )

    # CuTe kernels take any strides that keep 16-byte alignment, last dim contiguous
    strides = StrideRule(last_dim_contiguous=True, alignment=16)

    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 128
    SUPPORTS_GQA = True
    # a value head_dim of its own: its sm90 backward asserts equal head_dims under GQA,
    # fails to compile (64, 32) and exceeds shared memory at (64, 128) (4.0.0b36, H200)
    SUPPORTS_VALUE_HEAD_DIM = False
    # more host time per call than SDPA's cuDNN op: below this the launches, not the
    # kernels, set the time (docs/implementations.md, "auto")
    AUTO_MIN_TOKENS = 131072

    PACKAGE, EXTRA, TESTED_RELEASES = "flash-attn-4", "flash4", TESTED_VERSIONS
    UNTESTED_WHY = "; its private entry points change between releases"

    def package_version(self) -> str | None:
        return installed_version()

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        if spec.compute_capability is not None and spec.compute_capability[0] != 9:
            # its sm100/sm120 kernels exist but never ran here
            return [f"tested on compute capability 9.x (H100, H200) only, got {spec.compute_capability}"]
        return []

    def run_forward(self, q, k, v, causal, scale, out):
        # FA4 takes (batch, seq, heads, head_dim): the problem views go in transposed
        result, lse = _interface()._flash_attn_fwd(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=scale,
            causal=causal,
            return_lse=True,
            out=None if out is None else out.transpose(1, 2),
        )[:2]
        return result.transpose(1, 2), lse

    def run_backward(self, grad_out, q, k, v, out, lse, causal, scale, grads):
        into = {} if grads is None else dict(zip(("dq", "dk", "dv"), (g.transpose(1, 2) for g in grads)))
        dq, dk, dv = _interface()._flash_attn_bwd(
            *(x.transpose(1, 2) for x in (q, k, v, out, grad_out)), lse.contiguous(), scale, causal, **into
        )[:3]
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
