"""Backends on PyTorch's scaled_dot_product_attention kernels.

The public ``F.scaled_dot_product_attention`` does not return the
log-sum-exp, which the branch merge and the ring-attention backward need, so
these call the private aten ops directly. Their schemas change between
releases: every call goes through this one module, and ``PINNED_SCHEMAS``
is checked by the tests against the installed torch.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from .base import ANY_STRIDES, AttentionSpec, KernelBackend, PackedSequences, StrideRule, VarlenForm

aten = torch.ops.aten

#: The private ops and the schemas this module was written against.
PINNED_SCHEMAS: dict[str, str] = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, "
        "Tensor value, float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp)"
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, "
        "Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, "
        "float dropout_p, bool is_causal, *, Tensor? attn_mask=None, float? scale=None) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_flash_attention": (
        "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, Tensor unused, "
        "Tensor debug_attn_mask)"
    ),
    "_scaled_dot_product_flash_attention_backward": (
        "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, "
        "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
        "Tensor philox_seed, Tensor philox_offset, *, float? scale=None) -> "
        "(Tensor grad_query, Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_efficient_attention": (
        "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, "
        "Tensor value, Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., "
        "bool is_causal=False, *, float? scale=None) -> (Tensor output, "
        "Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)"
    ),
    "_scaled_dot_product_efficient_attention_backward": (
        "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, "
        "Tensor query, Tensor key, Tensor value, Tensor attn_bias, Tensor out, "
        "Tensor logsumexp, Tensor philox_seed, Tensor philox_offset, float dropout_p, "
        "bool[4] grad_input_mask, bool is_causal=False, *, float? scale=None) -> "
        "(Tensor, Tensor, Tensor, Tensor)"
    ),
    "_scaled_dot_product_cudnn_attention": (
        "aten::_scaled_dot_product_cudnn_attention(Tensor query, Tensor key, Tensor value, "
        "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., "
        "bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> "
        "(Tensor output, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, "
        "SymInt max_q, SymInt max_k, Tensor philox_seed, Tensor philox_offset, "
        "Tensor debug_attn_mask)"
    ),
    "_scaled_dot_product_cudnn_attention_backward": (
        "aten::_scaled_dot_product_cudnn_attention_backward(Tensor grad_out, Tensor query, "
        "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor philox_seed, "
        "Tensor philox_offset, Tensor attn_bias, Tensor cum_seq_q, Tensor cum_seq_k, "
        "SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, *, "
        "float? scale=None) -> (Tensor, Tensor, Tensor)"
    ),
}


#: The varlen ops FlashBackend calls, by the start of their schemas: later
#: releases append keyword arguments (paged KV, splits) this module does not pass.
VARLEN_SCHEMA_PREFIXES: dict[str, str] = {
    "_flash_attention_forward": (
        "aten::_flash_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, "
        "Tensor? cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
        "bool return_debug_mask, *, float? scale=None"
    ),
    "_flash_attention_backward": (
        "aten::_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, "
        "float dropout_p, bool is_causal, Tensor rng_state, Tensor unused, *, float? scale=None"
    ),
}


@functools.cache
def _varlen_schema_reasons() -> tuple[str, ...]:
    reasons = []
    for name, prefix in VARLEN_SCHEMA_PREFIXES.items():
        found = installed_schema(name)
        if found is None:
            reasons.append(f"torch.ops.aten.{name} (varlen) is missing in torch {torch.__version__}")
        elif not found.startswith(prefix):
            reasons.append(f"torch.ops.aten.{name} (varlen) changed its schema in torch {torch.__version__}")
    return tuple(reasons)


def installed_schema(op_name: str) -> str | None:
    op = getattr(aten, op_name, None)
    return None if op is None else str(op.default._schema)


@functools.cache
def _schema_reasons(*op_names: str) -> tuple[str, ...]:
    """Cached: the installed torch does not change, and formatting schemas showed in
    the host time of every call."""
    reasons = []
    for name in op_names:
        found = installed_schema(name)
        if found is None:
            reasons.append(f"torch.ops.aten.{name} is missing in torch {torch.__version__}")
        elif found != PINNED_SCHEMAS[name]:
            reasons.append(f"torch.ops.aten.{name} changed its schema in torch {torch.__version__}")
    return tuple(reasons)


#: the SDPA CUDA kernels: contiguous last dim, 16-byte aligned pointers and strides
_CUDA_STRIDES = StrideRule(last_dim_contiguous=True, alignment=16)


_HALF = (torch.float16, torch.bfloat16)


_NO_RNG: dict[torch.device, Tensor] = {}


def _no_rng(device: torch.device) -> Tensor:
    """A Philox seed or offset of a call without dropout: never read, but cuDNN's
    backward wants it on the inputs' device. One per device, shared by every
    backward, so that a backward makes none per problem. Not kept when made during
    a CUDA-graph capture, where it would live in that graph's pool, nor when it is
    not a plain tensor (fake, traced)."""
    found = _NO_RNG.get(device)
    if found is None:
        found = torch.zeros((), dtype=torch.int64, device=device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if type(found) is Tensor and not capturing:
            _NO_RNG[device] = found
    return found


class _SdpaBackend(KernelBackend):
    """A backend on SDPA's private ops: unusable where their schemas changed."""

    _ops: tuple[str, ...] = ()

    def release_reasons(self) -> list[str]:
        return list(_schema_reasons(*self._ops))


class CpuFlashBackend(_SdpaBackend):
    name = "sdpa_cpu_flash"
    description = "SDPA's CPU flash kernel (aten._scaled_dot_product_flash_attention_for_cpu)"
    # it reads the last dim as contiguous whatever its stride (wrong results, no error)
    strides = StrideRule(last_dim_contiguous=True)
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = (torch.float64, torch.float32, *_HALF)
    SUPPORTS_GQA = True
    VARLEN: ClassVar[VarlenForm] = "padded"
    _ops = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    )

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        if spec.seq_len == 1:
            # torch 2.11's CPU flash backward returns garbage gradients at length 1
            return ["length-1 problems are not sent to it (wrong gradients in torch 2.11)"]
        return []

    def forward(self, q, k, v, bias, causal, scale) -> tuple[Tensor, Tensor, Any]:
        bias = None if bias is None else bias.to(q.dtype)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
        return out, lse, None

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        bias = None if bias is None else bias.to(q.dtype)
        # the CPU kernel keeps the lse in the input dtype for float64
        lse = lse.to(accumulation_dtype(q.dtype))
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
        )


def _cuda_here(spec: AttentionSpec) -> bool:
    """Build features are checked only where CUDA runs; a question about CUDA asked
    on a CPU-only machine is answered for a standard CUDA build."""
    return spec.device_type == "cuda" and torch.cuda.is_available()


class FlashBackend(_SdpaBackend):
    name = "sdpa_flash"
    description = "SDPA's FlashAttention-2 kernel (aten._scaled_dot_product_flash_attention)"
    strides = _CUDA_STRIDES
    MIN_COMPUTE_CAPABILITY = (8, 0)
    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256
    SUPPORTS_BIAS = False
    SUPPORTS_GQA = True
    VARLEN: ClassVar[VarlenForm] = "native"
    _ops = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    )

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        if _cuda_here(spec) and not torch.backends.cuda.is_flash_attention_available():
            return ["this torch build has no flash attention"]
        return list(_varlen_schema_reasons()) if spec.varlen else []

    def forward_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, seqs: PackedSequences, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        cu, n = seqs.cu_seqlens, seqs.max_len
        out, lse, rng, unused, _ = aten._flash_attention_forward(
            q, k, v, cu, cu, n, n, 0.0, causal, False, scale=scale
        )
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(
                f"aten._flash_attention_forward returned a varlen lse of shape {tuple(lse.shape)}, "
                f"expected (heads, rows) = {(q.shape[1], q.shape[0])} (torch {torch.__version__})"
            )
        return out, lse.t(), (rng, unused)

    def backward_varlen(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        seqs: PackedSequences,
        causal: bool,
        scale: float,
        state: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # without dropout the backward reads neither the Philox seed nor its offset
        rng, unused = state if state is not None else (_no_rng(q.device), _no_rng(q.device))
        cu, n = seqs.cu_seqlens, seqs.max_len
        dq, dk, dv = aten._flash_attention_backward(
            grad_out, q, k, v, out, lse.t().contiguous(), cu, cu, n, n, 0.0, causal, rng, unused, scale=scale
        )
        return dq, dk, dv

    def forward(self, q, k, v, bias, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, rng, unused)

    def replay_state(self, length: int, device: torch.device) -> Any:
        # without dropout the backward reads neither the Philox seed nor its offset
        return (None, None, length, length, _no_rng(device), _no_rng(device))

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        cum_q, cum_k, max_q, max_k, rng, unused = state
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse.contiguous(),
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            causal,
            rng,
            unused,
            scale=scale,
        )


def _pad_bias(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """The memory-efficient kernel wants the bias's row stride 16-element aligned."""
    bias = bias.to(dtype)
    n = bias.shape[-1]
    padded_n = -(-n // 16) * 16
    if (
        padded_n == n
        and bias.stride(-1) == 1
        and all(s % 16 == 0 for s, size in zip(bias.stride()[:-1], bias.shape[:-1]) if size > 1)
    ):
        return bias
    out = bias.new_zeros(*bias.shape[:-1], padded_n)
    out[..., :n] = bias
    return out[..., :n]


class EfficientBackend(_SdpaBackend):
    name = "sdpa_efficient"
    description = (
        "SDPA's memory-efficient kernel (aten._scaled_dot_product_efficient_attention), "
        "computed in float32; the one CUDA kernel here that takes masks"
    )
    # every operand goes through a contiguous float32 copy (_in_float32)
    strides = ANY_STRIDES
    SUPPORTED_DTYPES = (torch.float32, *_HALF)
    MIN_COMPUTE_CAPABILITY = (5, 0)
    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 512
    SUPPORTS_VALUE_HEAD_DIM = True
    _ops = (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    )

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        if not torch.backends.cuda.mem_efficient_sdp_enabled():
            return ["torch.backends.cuda.mem_efficient_sdp_enabled() is False"]
        return []

    def forward(self, q, k, v, bias, causal, scale):
        dtype = q.dtype
        q, k, v = (_in_float32(x) for x in (q, k, v))
        if bias is not None:
            bias = _pad_bias(bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype)
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        # the kernel pads lse to a multiple of 32 rows; the state holds nothing per
        # head, so a backward may run on a subset of the heads
        return out.to(dtype), lse[..., : q.shape[2]], (seed, offset, lse.shape[-1])

    def replay_state(self, length: int, device: torch.device) -> Any:
        return (_no_rng(device), _no_rng(device), -(-length // 32) * 32)

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        seed, offset, padded_len = state
        dtype = q.dtype
        q, k, v, out, grad_out = (_in_float32(x) for x in (q, k, v, out, grad_out))
        if bias is not None:
            bias = _pad_bias(bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype)
        lse_padded = lse.new_zeros(*lse.shape[:-1], padded_len)
        lse_padded[..., : lse.shape[-1]] = lse
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out,
            q,
            k,
            v,
            bias,
            out,
            lse_padded,
            seed,
            offset,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _in_float32(x: Tensor) -> Tensor:
    """Measured on torch 2.11 / H100 (tests/test_gpu.py): the memory-efficient
    backward returns wrong, sometimes non-finite dq for bf16/fp16 branch
    problems, and wrong dq/dk for operands of mixed layouts; float32 in one
    contiguous layout is exact. So this backend computes in float32, on a copy
    with canonical strides (``contiguous()`` keeps any stride of a size-1 dim, and
    the kernel then finds no configuration)."""
    return x.to(torch.float32).clone(memory_format=torch.contiguous_format)


def cudnn_length_reasons(spec: AttentionSpec) -> list[str]:
    """What cuDNN's fused attention refuses by length, through any API."""
    return ["cuDNN does not support length-1 problems (s_q = s_kv = 1)"] if spec.seq_len == 1 else []


class CudnnBackend(_SdpaBackend):
    name = "sdpa_cudnn"
    description = "SDPA's cuDNN kernel (aten._scaled_dot_product_cudnn_attention)"
    strides = _CUDA_STRIDES
    MIN_COMPUTE_CAPABILITY = (9, 0)
    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 128
    SUPPORTS_BIAS = False
    SUPPORTS_GQA = True
    SUPPORTS_VALUE_HEAD_DIM = True
    _ops = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_cudnn_attention_backward",
    )

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        quirks = []
        if _cuda_here(spec) and not torch.backends.cudnn.is_available():
            quirks.append("cuDNN is not available")
        return quirks + cudnn_length_reasons(spec)

    #: dims of the lse cuDNN returns (4 or 3 by torch release), as its backward wants it back
    _lse_dims = 4

    def forward(self, q, k, v, bias, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        CudnnBackend._lse_dims = lse.dim()
        return out, lse.reshape(q.shape[:3]), (cum_q, cum_k, max_q, max_k, seed, offset, lse.dim())

    def replay_state(self, length: int, device: torch.device) -> Any:
        return (None, None, length, length, _no_rng(device), _no_rng(device), CudnnBackend._lse_dims)

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        cum_q, cum_k, max_q, max_k, seed, offset, lse_dims = state
        # cuDNN wants grad_out laid out like out; views of same-layout buffers already are
        if grad_out.stride() != out.stride():
            grad_out, out = grad_out.contiguous(), out.contiguous()
        lse = lse.contiguous()
        if lse_dims == 4:
            lse = lse[..., None]
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            seed,
            offset,
            None,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            causal,
            scale=scale,
        )
        return dq, dk, dv
