"""Kernel backends and their registry.

A backend is one module here plus one entry in ``REGISTRY``. Order is
preference: the first backend with no reason against a call runs it (the
order and the measurements behind it: docs/implementations.md, "auto").
"""

from __future__ import annotations

from .base import (
    ANY_STRIDES,
    AttentionSpec,
    Backend,
    IntoPlaceBackend,
    KernelBackend,
    PackedSequences,
    StrideRule,
)
from .cudnn_frontend import CudnnFrontendBackend
from .flash4 import Flash4Backend
from .math import MathBackend
from .sdpa import CpuFlashBackend, CudnnBackend, EfficientBackend, FlashBackend
from .xformers_fmha import XformersBackend

REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Flash4Backend(),
        CudnnBackend(),
        CudnnFrontendBackend(),
        FlashBackend(),
        EfficientBackend(),
        XformersBackend(),
        CpuFlashBackend(),
        MathBackend(),
    )
}


def not_supported_reasons(spec: AttentionSpec) -> dict[str, list[str]]:
    """Every registered backend with the reasons it cannot run ``spec`` (empty: it can)."""
    return {name: b.not_supported_reasons(spec) for name, b in REGISTRY.items()}


def auto_passes_over(backend: Backend, spec: AttentionSpec) -> str | None:
    """Why "auto" passes over ``backend`` for ``spec`` although it can run it (None:
    it does not): the call has fewer query tokens than its ``AUTO_MIN_TOKENS``."""
    if spec.tokens is None or spec.tokens >= backend.AUTO_MIN_TOKENS:
        return None
    return (
        f"'auto' takes it from {backend.AUTO_MIN_TOKENS} query tokens (batch·seq) per call, got "
        f"{spec.tokens}: below that its host time per kernel call costs more than its kernels save"
    )


def select_backend(spec: AttentionSpec, name: str | None = None) -> Backend:
    """The backend named ``name``, or the first that can run ``spec`` and that "auto"
    does not pass over (:func:`auto_passes_over`; if every one that can run is passed
    over, the first of them).

    Raises ValueError naming the reasons when the requested backend cannot run.
    """
    if name is not None:
        if name not in REGISTRY:
            raise ValueError(f"backend must be one of {sorted(REGISTRY)}, got {name!r}")
        reasons = REGISTRY[name].not_supported_reasons(spec)
        if reasons:
            raise ValueError(f"backend {name!r} cannot run this call: {'; '.join(reasons)}")
        return REGISTRY[name]
    passed_over = None
    for backend in REGISTRY.values():
        if not backend.not_supported_reasons(spec):
            if auto_passes_over(backend, spec) is None:
                return backend
            passed_over = passed_over or backend
    if passed_over is not None:
        return passed_over
    raise ValueError(f"no kernel backend can run {spec}: {not_supported_reasons(spec)}")


__all__ = [
    "ANY_STRIDES",
    "REGISTRY",
    "AttentionSpec",
    "Backend",
    "IntoPlaceBackend",
    "KernelBackend",
    "PackedSequences",
    "StrideRule",
    "auto_passes_over",
    "not_supported_reasons",
    "select_backend",
]
