"""The kernel registry: pinned private-op schemas, selection reasons, and each
CPU backend's forward/backward against plain autograd attention."""

import dataclasses
import math

import pytest
import torch

from dilated_attention_pytorch import kernels
from dilated_attention_pytorch.kernels import math as math_kernel
from dilated_attention_pytorch.kernels import sdpa

from ..conftest import assert_close


@pytest.mark.parametrize("op", sorted(sdpa.PINNED_SCHEMAS))
def test_pinned_schemas_match_installed_torch(op):
    # a mismatch means the backend reports itself unusable; update sdpa.py with care
    assert sdpa.installed_schema(op) == sdpa.PINNED_SCHEMAS[op]


def test_registry_order_and_names():
    assert list(kernels.REGISTRY) == [
        "flash_attn_4",
        "sdpa_cudnn",
        "cudnn_frontend",
        "sdpa_flash",
        "sdpa_efficient",
        "xformers",
        "sdpa_cpu_flash",
        "math",
    ]
    for name, backend in kernels.REGISTRY.items():
        assert backend.name == name and backend.description


def test_reasons_are_specific():
    spec = kernels.AttentionSpec("cuda", torch.float32, 12, has_bias=True, compute_capability=(8, 6))
    reasons = kernels.not_supported_reasons(spec)
    assert any("needs compute capability >= (9, 0)" in r for r in reasons["sdpa_cudnn"])
    assert any("dtype torch.float32 not supported" in r for r in reasons["sdpa_flash"])
    assert any("takes no attention bias" in r for r in reasons["sdpa_flash"])
    assert any("head_dim must be a multiple of 8" in r for r in reasons["sdpa_efficient"])
    assert any("cpu only" in r for r in reasons["sdpa_cpu_flash"])
    assert reasons["math"] == []


def _pinned_optional_backend(monkeypatch, module, name: str, missing: str):
    """The registry's ``name`` backend of ``module`` (an optional package pinned to
    ``TESTED_VERSIONS``): absent, its only reason is ``missing``; at a tested
    release, a bf16 sm90 call has none. Left at a tested release."""
    backend = kernels.REGISTRY[name]
    spec = kernels.AttentionSpec("cuda", torch.bfloat16, 64, compute_capability=(9, 0))
    monkeypatch.setattr(module, "installed_version", lambda: None)
    assert backend.not_supported_reasons(spec) == [missing]
    monkeypatch.setattr(module, "installed_version", lambda: module.TESTED_VERSIONS[0])
    assert backend.not_supported_reasons(spec) == []
    return backend, spec


def test_flash_attn_4_reasons(monkeypatch):
    from dilated_attention_pytorch.kernels import flash4

    backend, spec = _pinned_optional_backend(
        monkeypatch,
        flash4,
        "flash_attn_4",
        'flash-attn-4 is not installed (pip install "torch-dilated-attention[flash4]")',
    )
    bad = kernels.AttentionSpec("cuda", torch.float32, 256, has_bias=True, compute_capability=(8, 0))
    reasons = " | ".join(backend.not_supported_reasons(bad))
    for part in (
        "compute capability 9.x (H100, H200) only",
        "dtype torch.float32",
        "head_dim must be",
        "no attention bias",
    ):
        assert part in reasons
    monkeypatch.setattr(flash4, "installed_version", lambda: "4.1.0")
    assert "untested here" in backend.not_supported_reasons(spec)[0]
    cpu = kernels.AttentionSpec("cpu", torch.float32, 8)
    assert "runs on cuda only" in backend.not_supported_reasons(cpu)[-1]


def test_cudnn_frontend_reasons(monkeypatch):
    from dilated_attention_pytorch.kernels import cudnn_frontend

    backend, spec = _pinned_optional_backend(
        monkeypatch,
        cudnn_frontend,
        "cudnn_frontend",
        'nvidia-cudnn-frontend is not installed (pip install "torch-dilated-attention[cudnn]")',
    )
    value_dim = kernels.AttentionSpec(
        "cuda", torch.float16, 64, compute_capability=(9, 0), value_head_dim=128
    )
    assert backend.not_supported_reasons(value_dim) == []
    bad = kernels.AttentionSpec(
        "cuda", torch.float32, 256, has_bias=True, compute_capability=(8, 0), seq_len=1
    )
    reasons = " | ".join(backend.not_supported_reasons(bad))
    for part in ("compute capability >= (9, 0)", "dtype torch.float32", "head_dim must be",
                 "no attention bias", "length-1 problems"):  # fmt: skip
        assert part in reasons
    newer = kernels.AttentionSpec("cuda", torch.bfloat16, 64, compute_capability=(10, 0))
    assert backend.not_supported_reasons(newer) == [
        "tested on compute capability 9.x (H200) only, got (10, 0)"
    ]
    monkeypatch.setattr(cudnn_frontend, "installed_version", lambda: "1.40.0")
    assert "untested here" in backend.not_supported_reasons(spec)[0]
    cpu = kernels.AttentionSpec("cpu", torch.float32, 8)
    assert "runs on cuda only" in backend.not_supported_reasons(cpu)[-1]


def test_xformers_reasons(monkeypatch):
    from dilated_attention_pytorch.kernels import xformers_fmha

    backend = kernels.REGISTRY["xformers"]
    spec = kernels.AttentionSpec("cuda", torch.float32, 64, compute_capability=(9, 0))
    monkeypatch.setattr(xformers_fmha, "installed_version", lambda: None)
    assert backend.not_supported_reasons(spec) == [
        'xformers is not installed (pip install "torch-dilated-attention[xformers]")'
    ]
    monkeypatch.setattr(xformers_fmha, "installed_version", lambda: "0.0.99")
    monkeypatch.setattr(xformers_fmha, "import_error", lambda: None)
    monkeypatch.setattr(xformers_fmha, "_extension_loaded", lambda: True)  # on a CUDA machine it is asked
    assert backend.not_supported_reasons(spec) == []  # public API: other releases are not refused
    bad = kernels.AttentionSpec("cuda", torch.float64, 256, has_bias=True, compute_capability=(7, 5))
    reasons = " | ".join(backend.not_supported_reasons(bad))
    for part in (
        "compute capability >= (8, 0)",
        "dtype torch.float64",
        "head_dim must be",
        "no attention bias",
    ):
        assert part in reasons
    cpu = kernels.AttentionSpec("cpu", torch.float32, 64)
    assert backend.not_supported_reasons(cpu) == ["runs on cuda only, got device cpu"]
    # checked only where CUDA runs (importing xformers is slow)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(xformers_fmha, "_extension_loaded", lambda: True)
    assert backend.not_supported_reasons(spec) == []
    monkeypatch.setattr(xformers_fmha, "_extension_loaded", lambda: False)
    assert backend.not_supported_reasons(spec) == [
        "xformers' C++/CUDA extension did not load (built for another torch or CUDA), "
        "so its operators refuse CUDA inputs"
    ]
    monkeypatch.setattr(xformers_fmha, "import_error", lambda: "ImportError: no _C")
    assert backend.not_supported_reasons(spec) == ["xformers.ops.fmha does not import: ImportError: no _C"]


def test_import_error_names_the_failure(monkeypatch):
    from dilated_attention_pytorch.kernels import xformers_fmha

    def broken():
        raise ImportError("undefined symbol: _ZN3c10\nsecond line")

    monkeypatch.setattr(xformers_fmha, "_fmha", broken)
    xformers_fmha.import_error.cache_clear()
    try:
        assert xformers_fmha.import_error() == "ImportError: undefined symbol: _ZN3c10"
    finally:
        xformers_fmha.import_error.cache_clear()


def test_select_backend_errors():
    spec = kernels.AttentionSpec("cpu", torch.float32, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.select_backend(spec, "nope")
    with pytest.raises(ValueError, match="backend 'sdpa_cudnn' cannot run this call: runs on cuda only"):
        kernels.select_backend(spec, "sdpa_cudnn")
    assert kernels.select_backend(spec).name == "sdpa_cpu_flash"


CPU_BACKENDS = ["math", "sdpa_cpu_flash"]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_backend_forward_backward(name, causal, with_bias):
    backend = kernels.REGISTRY[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(3, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    bias = None
    if with_bias:
        bias = torch.randn(3, 1, 1, 9, generator=g, dtype=torch.float64)
        bias[0, ..., 3] = -math.inf
    out, lse, state = backend.forward(q.detach(), k.detach(), v.detach(), bias, causal, 0.5)
    exp_out, exp_lse = math_kernel.attention_lse(q, k, v, bias, causal, 0.5)
    assert_close(out, exp_out, torch.float64, "out")
    assert_close(lse, exp_lse, torch.float64, "lse")
    do = torch.randn_like(out)
    exp_grads = torch.autograd.grad(exp_out, (q, k, v), do)
    got = backend.backward(do, q.detach(), k.detach(), v.detach(), out, lse, bias, causal, 0.5, state)
    for a, b in zip(got, exp_grads):
        assert_close(a, b, torch.float64, "grad")


def test_math_attention_empty_rows():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.full((1, 1, 1, 3), -math.inf, dtype=torch.float64)
    out, lse = math_kernel.attention_lse(q, k, v, bias)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_auto_passes_over_flash_attn_4_below_its_token_floor(monkeypatch):
    from dilated_attention_pytorch.kernels import flash4

    monkeypatch.setattr(flash4, "installed_version", lambda: flash4.TESTED_VERSIONS[0])
    floor = flash4.Flash4Backend.AUTO_MIN_TOKENS
    spec = kernels.AttentionSpec("cuda", torch.bfloat16, 64, compute_capability=(9, 0))
    for tokens, chosen in ((None, "flash_attn_4"), (floor, "flash_attn_4"), (floor - 1, "sdpa_cudnn")):
        assert kernels.select_backend(dataclasses.replace(spec, tokens=tokens)).name == chosen
    small = dataclasses.replace(spec, tokens=32768)
    assert kernels.select_backend(small, "flash_attn_4").name == "flash_attn_4"  # named: any size
    assert kernels.auto_passes_over(kernels.REGISTRY["flash_attn_4"], small) == (
        f"'auto' takes it from {floor} query tokens (batch·seq) per call, got 32768: below that its "
        "host time per kernel call costs more than its kernels save"
    )
    assert kernels.auto_passes_over(kernels.REGISTRY["sdpa_cudnn"], small) is None


def test_auto_takes_a_passed_over_backend_where_no_later_one_runs(monkeypatch):
    class Floored:
        name, AUTO_MIN_TOKENS = "floored", 1000

        def not_supported_reasons(self, spec):
            return []

    class Refusing(Floored):
        name, AUTO_MIN_TOKENS = "refusing", 0

        def not_supported_reasons(self, spec):
            return ["refuses everything"]

    monkeypatch.setattr(kernels, "REGISTRY", {"floored": Floored(), "refusing": Refusing()})
    spec = kernels.AttentionSpec("cpu", torch.float32, 8, tokens=10)
    assert kernels.select_backend(spec).name == "floored"
