"""``create_*`` factories and the "auto" choice, which can explain itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import kernels
from .modules import DilatedAttention, ImprovedDilatedAttention, RingDilatedAttention, _DilatedAttentionBase
from .multihead import (
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    _MultiheadDilatedAttentionBase,
)
from .pattern import LONGNET_DILATION_RATES, LONGNET_SEGMENT_LENGTHS
from .sparse.modules import (
    BlockSparseAdaptive,
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
)

ATTENTION_TYPES: tuple[str, ...] = ("auto", "standard", "improved", "ring", "block_sparse_ring")

_CORE: dict[str, type[_DilatedAttentionBase]] = {
    "standard": DilatedAttention,
    "improved": ImprovedDilatedAttention,
    "ring": RingDilatedAttention,
    "block_sparse_ring": BlockSparseRingDilatedAttention,
}
_MULTIHEAD: dict[str, type[_MultiheadDilatedAttentionBase]] = {
    "standard": MultiheadDilatedAttention,
    "improved": ImprovedMultiheadDilatedAttention,
    "ring": RingMultiheadDilatedAttention,
    "block_sparse_ring": BlockSparseRingMultiheadDilatedAttention,
}

#: Defaults of a bare ``create_multihead_dilated_attention("auto")``: LongNet's base setting.
MULTIHEAD_DEFAULTS: dict[str, Any] = {
    "embed_dim": 768,
    "num_heads": 12,
    "segment_lengths": list(LONGNET_SEGMENT_LENGTHS),
    "dilation_rates": list(LONGNET_DILATION_RATES),
}


@dataclass
class AutoChoice:
    """What "auto" picked for a call and why every other option lost."""

    attention_type: str
    backend: str
    spec: kernels.AttentionSpec
    rejected_types: dict[str, list[str]] = field(default_factory=dict)
    rejected_backends: dict[str, list[str]] = field(default_factory=dict)
    #: set when the question is about hardware this machine does not have
    hypothetical: str | None = None
    #: what else decides the backend per call (the call's size, say)
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        lines = [
            f"auto -> attention_type={self.attention_type!r}, kernel backend={self.backend!r}",
            f"  for {self.spec.device_type} {self.spec.dtype}, head_dim {self.spec.head_dim}"
            + (
                f", compute capability {self.spec.compute_capability}" if self.spec.compute_capability else ""
            ),
        ]
        if self.hypothetical:
            lines.append(f"  hypothetical: {self.hypothetical}")
        lines += [f"  note: {note}" for note in self.notes]
        for name, reasons in self.rejected_types.items():
            lines.append(f"  type {name!r} not chosen: {'; '.join(reasons)}")
        for name, reasons in self.rejected_backends.items():
            lines.append(f"  backend {name!r} not chosen: {'; '.join(reasons)}")
        return "\n".join(lines)

    __str__ = explain


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def explain_auto(
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int = 64,
    has_mask: bool = False,
    compute_capability: tuple[int, int] | None = None,
    world_size: int | None = None,
    tokens: int | None = None,
) -> AutoChoice:
    """What "auto" chooses for inputs of this kind, with reasons.

    ``device`` defaults to CUDA when available, ``dtype`` to bfloat16 on CUDA
    and float32 on CPU. ``compute_capability`` and ``world_size`` can be given
    to ask about other hardware (defaults: this machine's). ``tokens``: the
    calls' batch·seq (None: any; the choice then notes where a size changes it).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if compute_capability is None and device.type == "cuda" and torch.cuda.is_available():
        compute_capability = torch.cuda.get_device_capability(device)
    hypothetical = None
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"built with CUDA {torch.version.cuda}"
        hypothetical = f"this machine has no usable CUDA device (torch {torch.__version__}, {built})"
        if compute_capability is None:
            hypothetical += "; compute capability unknown, pass compute_capability=(9, 0) to ask about a GPU"
    spec = kernels.AttentionSpec(device.type, dtype, head_dim, has_mask, compute_capability, tokens=tokens)
    world = _distributed_world_size() if world_size is None else world_size
    reasons = kernels.not_supported_reasons(spec)
    backend = kernels.select_backend(spec).name
    rejected_backends = {name: r for name, r in reasons.items() if r}
    order = list(kernels.REGISTRY)
    for name in order[: order.index(backend)]:
        passed_over = kernels.auto_passes_over(kernels.REGISTRY[name], spec)
        if passed_over is not None and not reasons[name]:
            rejected_backends[name] = [passed_over]
    # rank the backends after the chosen one as "slower" only if they could run
    for name in order[order.index(backend) + 1 :]:
        rejected_backends.setdefault(name, []).append(f"{backend!r} is preferred on this hardware")
    notes = []
    floor = kernels.REGISTRY[backend].AUTO_MIN_TOKENS
    if tokens is None and floor:
        below = kernels.select_backend(dataclasses.replace(spec, tokens=0)).name
        if below != backend:
            notes.append(f"calls of fewer than {floor} query tokens (batch·seq) run on {below!r}")
    rejected_types = {
        "standard": [
            "computes the same function with copy-gathers and plain torch attention; "
            "'improved' uses strided views and fused kernels"
        ],
        "ring": [
            "takes sequence shards, and 'auto' cannot tell shards from data-parallel batches; "
            "ask for attention_type='ring' when each rank holds a slice of the sequence"
            + (f" (torch.distributed world size is {world})" if world > 1 else "")
        ],
        "block_sparse_ring": [
            "computes a sparser function (dilated attention restricted to a block layout), so "
            "'auto' never substitutes it; ask for it by name"
        ],
    }
    return AutoChoice("improved", backend, spec, rejected_types, rejected_backends, hypothetical, notes)


def _resolve(attention_type: str, **spec: Any) -> tuple[str, AutoChoice | None]:
    """The type to build and, for "auto", the choice for calls described by ``spec``
    (the :func:`explain_auto` arguments)."""
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {list(ATTENTION_TYPES)}, got {attention_type!r}")
    if attention_type == "auto":
        choice = explain_auto(**spec)
        return choice.attention_type, choice
    return attention_type, None


def create_dilated_attention(attention_type: str = "auto", **kwargs: Any) -> nn.Module:
    """A core module (``(batch, seq, heads, head_dim)`` in and out).

    ``attention_type``: "auto", "standard", "improved", "ring" (sequence shards
    over ``torch.distributed``; takes ``process_group``) or "block_sparse_ring"
    (restricted to a block layout; see :func:`create_block_sparse_attention`). ``kwargs`` go to the
    module; ``segment_lengths``/``dilation_rates`` default to LongNet's base
    setting. With "auto" the module's ``auto_choice`` says what was picked and why.
    """
    name, choice = _resolve(attention_type)
    kwargs.setdefault("segment_lengths", list(LONGNET_SEGMENT_LENGTHS))
    kwargs.setdefault("dilation_rates", list(LONGNET_DILATION_RATES))
    module = _CORE[name](**kwargs)
    module.auto_choice = choice
    return module


def create_multihead_dilated_attention(attention_type: str = "auto", **kwargs: Any) -> nn.MultiheadAttention:
    """A drop-in ``nn.MultiheadAttention`` replacement.

    Every argument of :class:`MultiheadDilatedAttention` can be given; missing
    ones take LongNet's base setting (embed_dim 768, 12 heads, segment_lengths
    [2048, 4096, 8192, 16384, 32768], dilation_rates [1, 2, 4, 6, 12]).
    """
    for key, value in MULTIHEAD_DEFAULTS.items():
        kwargs.setdefault(key, value)
    # "auto" explains itself for the module's own calls: its head_dim, dtype and device
    embed_dim, num_heads = kwargs["embed_dim"], kwargs["num_heads"]
    head_dim = embed_dim // num_heads if isinstance(embed_dim, int) and isinstance(num_heads, int) else 64
    device = kwargs.get("device")
    spec = {"head_dim": head_dim, "dtype": kwargs.get("dtype") or torch.get_default_dtype(),
            "device": device if device is not None else "cpu"}  # fmt: skip
    name, choice = _resolve(attention_type, **spec)
    module = _MULTIHEAD[name](**kwargs)
    module.auto_choice = choice
    return module


def create_block_sparse_attention(
    pattern: Any = "dilated_sparse", *, multihead: bool = False, **kwargs: Any
) -> nn.Module:
    """A block-sparse module: dilated attention restricted to a block layout.

    ``pattern``: "local_window", "dilated_sparse", "global_local", "random",
    "hilbert" (with ``spatial_shape``), a callable ``fn(n_blocks) -> bool layout``
    (:class:`BlockSparseRingDilatedAttention`), or "adaptive" (key blocks chosen
    from the content, :class:`BlockSparseAdaptive`; core module only).
    ``multihead=True`` gives the ``nn.MultiheadAttention`` drop-in
    (:class:`BlockSparseRingMultiheadDilatedAttention`). Other ``kwargs``
    (``sparsity``, ``block_size``, ``seed``, pattern arguments, ...) go to the
    module; missing pattern arguments take LongNet's base setting.
    """
    if pattern == "adaptive":
        if multihead:
            raise ValueError("pattern='adaptive' has no multihead module; use multihead=False")
        cls: type[nn.Module] = BlockSparseAdaptive
    else:
        cls = BlockSparseRingMultiheadDilatedAttention if multihead else BlockSparseRingDilatedAttention
        kwargs["pattern"] = pattern
    defaults = (
        MULTIHEAD_DEFAULTS
        if multihead
        else {
            "segment_lengths": list(LONGNET_SEGMENT_LENGTHS),
            "dilation_rates": list(LONGNET_DILATION_RATES),
        }
    )
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return cls(**kwargs)
