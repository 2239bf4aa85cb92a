"""Shared fixtures: the one tolerance table, the implementations under test,
input factories and the GPU marker."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from dilated_attention_pytorch import functional
from dilated_attention_pytorch.core import _triton


def pytest_configure(config: pytest.Config) -> None:
    # each xdist worker takes its share of the cores: N workers x all cores oversubscribes the CPU
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _backward_head_chunks_as_on_long_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "all"-mode backward goes in head chunks on long sequences; the small
    inputs of the tests would take every head at once within the default slack
    (``fused.BACKWARD_CHUNK_SLACK_BYTES``), so tests run without it: the chunked
    path is the one covered. Tests of the slack set it back (``DEFAULT_SLACK``)."""
    from dilated_attention_pytorch.core import fused

    monkeypatch.setattr(fused, "BACKWARD_CHUNK_SLACK_BYTES", 0)


@pytest.fixture(autouse=True)
def _large_problem_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped results are written region by region from ``fused.PLACE_MIN_ELEMENTS``
    elements per problem, and copies go as wide elements from
    ``views.WIDE_COPY_MIN_BYTES``, both far above the tests' inputs: tests run
    without the thresholds, so the long sequences' paths are the ones covered; the
    tests of the short ones set them back."""
    from dilated_attention_pytorch.core import fused, views

    monkeypatch.setattr(fused, "PLACE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(views, "WIDE_COPY_MIN_BYTES", 0)


#: both head modes, "all" (every head in every branch: several times the calls) in the slow set;
#: for the heavy numerical checks (gradcheck and friends)
HEAD_MODES_ALL_SLOW = ["grouped", pytest.param("all", marks=pytest.mark.slow)]

#: max |actual - expected| / max |expected|, per dtype of the implementation's inputs.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}


def relative_error(actual: Tensor, expected: Tensor, floor: float = 1e-30) -> float:
    """max |actual - expected| / max(max |expected|, floor)."""
    scale = expected.abs().max().clamp_min(floor)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "", floor: float = 1e-30
) -> None:
    """``floor``: the smallest scale errors are relative to (for an ``expected`` that
    is 0 up to rounding, e.g. dq of a single key)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected, floor)
    assert err <= TOLERANCES[dtype], f"{what}: relative error {err:.3g} > {TOLERANCES[dtype]:g} ({dtype})"


@dataclass(frozen=True)
class Impl:
    """An implementation of the function under test: ``(q, k, v, **kw) -> out``."""

    name: str
    method: str
    backend: str | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, segment_lengths, dilation_rates, **kw) -> Tensor:
        return functional.dilated_attention(
            q, k, v, segment_lengths, dilation_rates, method=self.method, backend=self.backend, **kw
        )


def impls_on(device_type: str) -> list[Impl]:
    """Every implementation that runs on ``device_type``: the gather path, the fused
    path on "auto", and the fused path on each registered backend that declares
    the device (the matrix follows ``kernels.REGISTRY``)."""
    from dilated_attention_pytorch import kernels

    return [Impl("standard", "gather"), Impl("improved-auto", "fused")] + [
        Impl(f"improved-{name}", "fused", name)
        for name, backend in kernels.REGISTRY.items()
        if backend.SUPPORTED_DEVICES is None or device_type in backend.SUPPORTED_DEVICES
    ]


#: Every implementation that runs on CPU. The modules are thin wrappers over
#: these (tests/test_modules.py checks they agree).
CPU_IMPLS: list[Impl] = impls_on("cpu")

#: Patterns: (segment_lengths, dilation_rates, seq_len, heads). They cover partial
#: last segments, seq < w, w % r != 0, heads < branches, and r > heads.
PATTERNS: list[tuple[tuple[int, ...], tuple[int, ...], int, int]] = [
    ((8,), (1,), 16, 2),  # one dense branch, full segments
    ((4, 8), (1, 2), 19, 4),  # partial last segment in both branches
    ((6, 16, 5), (1, 3, 2), 21, 5),  # w % r != 0, seq < w for branch 1
    ((4, 8, 12), (1, 2, 4), 24, 2),  # heads < branches: an empty group
    ((32,), (6,), 20, 3),  # seq < w and r > heads
]


def make_qkv(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int = 4,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    requires_grad: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
        .to(device=device, dtype=dtype)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )


#: Memory layouts users pass: name -> (shape of the leaf, leaf -> ``(b, n, h, d)`` view).
#: The "expand_*" ones repeat values (stride 0); "offset" starts one element in.
LAYOUTS: dict[str, tuple[Callable[[int, int, int, int], tuple[int, ...]], Callable[[Tensor], Tensor]]] = {
    "contiguous": (lambda b, n, h, d: (b, n, h, d), lambda x: x),
    "seq_major": (lambda b, n, h, d: (n, b, h, d), lambda x: x.transpose(0, 1)),
    "reversed_dims": (lambda b, n, h, d: (d, h, n, b), lambda x: x.permute(3, 2, 1, 0)),
    "heads_innermost": (lambda b, n, h, d: (b, n, d, h), lambda x: x.transpose(2, 3)),  # "b n (d h)"
    "step_last": (lambda b, n, h, d: (b, n, h, 2 * d), lambda x: x[..., ::2]),
    "step_seq": (lambda b, n, h, d: (b, 2 * n, h, d), lambda x: x[:, ::2]),
    "step_heads": (lambda b, n, h, d: (b, n, 2 * h, d), lambda x: x[:, :, 1::2]),
    "offset": (lambda b, n, h, d: (b * n * h * d + 1,), None),  # type: ignore[dict-item]
    "packed_qkv": (lambda b, n, h, d: (b, n, 3, h, d), lambda x: x[:, :, 1]),
    "expand_batch": (lambda b, n, h, d: (1, n, h, d), None),  # type: ignore[dict-item]
    "expand_heads": (lambda b, n, h, d: (b, n, 1, d), None),  # type: ignore[dict-item]
    "expand_last": (lambda b, n, h, d: (b, n, h, 1), None),  # type: ignore[dict-item]
}


def make_strided(
    layout: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """A leaf that requires grad and a ``shape`` view of it in ``layout``."""
    leaf_shape, _ = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(leaf_shape(*shape), generator=g, dtype=torch.float64).to(device, dtype)
    leaf.requires_grad_()
    return leaf, strided_view(layout, leaf, shape)


def strided_view(layout: str, leaf: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """The ``shape`` view of ``leaf`` (made by :func:`make_strided`) in ``layout``."""
    if layout == "offset":
        return leaf[1:].view(shape)
    if layout.startswith("expand_"):
        return leaf.expand(shape)
    return LAYOUTS[layout][1](leaf)


def grads(out: Tensor, inputs: tuple[Tensor, ...], grad_out: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad_out)


def held_by_cycles(step: Callable[[], Sequence[object]]) -> list[int]:
    """Indices of the objects ``step`` returns (its inputs, outputs, gradients) that
    outlive their last reference, with the garbage collector off: held by reference
    cycles, which on a GPU make the next step's peak depend on when it runs."""
    gc.collect()
    gc.disable()
    try:
        refs = [weakref.ref(x) for x in step()]
        return [i for i, r in enumerate(refs) if r() is not None]
    finally:
        gc.enable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_triton = pytest.mark.skip(reason="needs Triton")
    for item in items:
        if "triton" in item.keywords and not _triton.AVAILABLE:
            item.add_marker(skip_triton)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # Triton kernel tests also run on CPU under Triton's interpreter (TRITON_INTERPRET=1)
        if "gpu" in item.keywords and not ("triton" in item.keywords and _triton.INTERPRETED):
            item.add_marker(skip)


#: where the Triton kernel tests run: the GPU, or the CPU under Triton's interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
