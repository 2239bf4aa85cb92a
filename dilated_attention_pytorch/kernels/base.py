"""What a kernel backend is: metadata it is judged on, and the calls it offers."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from .varlen_padding import Bucket, buckets


@dataclass(frozen=True)
class AttentionSpec:
    """Metadata of one call, enough to decide which backend can run it.

    ``compute_capability`` is injectable so selection is testable on CPU.
    """

    device_type: str
    dtype: torch.dtype
    head_dim: int
    has_bias: bool = False
    compute_capability: tuple[int, int] | None = None
    #: query/key length of the problem, when known (None: any)
    seq_len: int | None = None
    #: the value's head_dim, when it differs from ``head_dim`` (None: the same)
    value_head_dim: int | None = None
    #: packed sequences (``cu_seqlens``): needs a backend with a varlen form
    varlen: bool = False
    #: query tokens of the whole call (batch·seq), when known (None: any); "auto"
    #: weighs a backend's ``AUTO_MIN_TOKENS`` against it
    tokens: int | None = None

    @classmethod
    def from_tensor(
        cls,
        x: Tensor,
        *,
        has_bias: bool = False,
        seq_len: int | None = None,
        value: Tensor | None = None,
        tokens: int | None = None,
    ) -> AttentionSpec:
        """Spec of ``(batch, seq, heads, head_dim)`` or ``(batch, heads, seq, head_dim)``
        queries ``x`` (and ``value``, whose last dim may differ)."""
        cc = None
        if x.device.type == "cuda":
            cc = torch.cuda.get_device_capability(x.device)
        value_dim = None if value is None or value.shape[-1] == x.shape[-1] else value.shape[-1]
        return cls(x.device.type, x.dtype, x.shape[-1], has_bias, cc, seq_len, value_dim, tokens=tokens)


@dataclass(frozen=True)
class StrideRule:
    """The memory layouts a kernel reads and writes correctly, as data.

    ``last_dim_contiguous``: ``stride(-1) == 1`` (every SDPA kernel; the CPU
    flash kernel silently computes garbage otherwise). ``alignment``: bytes that
    the data pointer and every other stride (of size-1 dimensions too) must be
    a multiple of. A tensor outside the rule is copied (:meth:`conform`)
    before the kernel sees it, never passed on.
    """

    last_dim_contiguous: bool = True
    alignment: int = 1

    def accepts(self, x: Tensor) -> bool:
        if self.last_dim_contiguous and x.shape[-1] > 1 and x.stride(-1) != 1:
            return False
        if self.alignment > 1:
            size = x.element_size()
            if x.data_ptr() % self.alignment:
                return False
            # dims of size 1 too: kernels check every stride (the memory-efficient one found
            # "no kernel" for a one-head problem whose head stride was 1)
            if any((s * size) % self.alignment for s in x.stride()[:-1]):
                return False
        return True

    @classmethod
    def strictest(cls, rules: Iterable[StrideRule]) -> StrideRule:
        """The rule that accepts what every one of ``rules`` accepts."""
        rules = list(rules)
        return cls(
            last_dim_contiguous=any(r.last_dim_contiguous for r in rules),
            alignment=math.lcm(1, *(r.alignment for r in rules)),
        )

    def conform(self, x: Tensor) -> Tensor:
        """``x``, or a contiguous copy in fresh (aligned) memory where the rule refuses it."""
        if self.accepts(x):
            return x
        # contiguous() of a contiguous tensor is itself, at its unaligned offset
        return x.clone(memory_format=torch.contiguous_format) if x.is_contiguous() else x.contiguous()


#: any layout (plain torch ops)
ANY_STRIDES = StrideRule(last_dim_contiguous=False)


#: "native": a varlen kernel (one call for all sequences); "padded": the
#: sequences padded into batches of power-of-two length (:mod:`.varlen_padding`)
VarlenForm = Literal["native", "padded"] | None


@dataclass(frozen=True)
class PackedSequences:
    """Sequences packed one after another: ``cu_seqlens`` int32 ``(num_seqs + 1,)``
    on the inputs' device, ``lengths`` the same on the host, ``max_len`` the longest."""

    cu_seqlens: Tensor
    lengths: tuple[int, ...]
    max_len: int

    @functools.cached_property
    def padded_buckets(self) -> list[Bucket]:
        """The sequences' length buckets for the "padded" varlen form, made once
        (the forward and the backward of a packing both need them)."""
        return buckets(list(self.lengths), self.cu_seqlens.device)


class Backend(Protocol):
    """One attention kernel that returns the log-sum-exp and has a backward.

    Tensors are ``(batch, heads, len, head_dim)``, within the backend's ``strides``
    (the fused path conforms them);
    ``lse`` is float32 (float64 for float64 inputs) ``(batch, heads, len)``.
    What a row with no allowed key returns is kernel-specific: callers derive
    such rows from the bias.
    ``bias`` is additive, broadcastable to ``(batch, heads, len, len)``.
    """

    name: ClassVar[str]
    #: one line for `info` and the docs
    description: ClassVar[str]
    #: the layouts its kernels take, for inputs, outputs and gradients alike
    strides: ClassVar[StrideRule]
    #: whether it offers ``forward_into``/``backward_into`` (:class:`IntoPlaceBackend`)
    WRITES_INTO_PLACE: ClassVar[bool]
    #: whether key/value may have fewer heads than the query (see :class:`KernelBackend`)
    SUPPORTS_GQA: ClassVar[bool]
    #: whether the value's head_dim may differ from the query's (see :class:`KernelBackend`)
    SUPPORTS_VALUE_HEAD_DIM: ClassVar[bool]
    #: its varlen form (see :class:`KernelBackend`): "native", "padded" or None
    VARLEN: ClassVar[VarlenForm]
    #: the fewest query tokens per call at which "auto" takes it (see :class:`KernelBackend`)
    AUTO_MIN_TOKENS: ClassVar[int]

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        """Empty when the backend can run ``spec``; else why not, one reason each."""
        ...

    def replay_state(self, length: int, device: torch.device) -> Any:
        """The ``state`` of a ``length``-row forward on ``device``, rebuilt without it."""
        ...

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Any]:
        """``(out, lse, state)``; ``state`` is whatever ``backward`` needs, and
        nothing per head: a backward may run on a subset of the heads (with the
        matching slices of the tensors and the bias)."""
        ...

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        bias: Tensor | None,
        causal: bool,
        scale: float,
        state: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)`` given the output and lse the softmax is normalised by.

        Passing a merged ``out``/``lse`` (several branches) gives that branch's
        share of the merged gradient: the ring-attention identity.
        """
        ...

    def forward_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, seqs: PackedSequences, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        """``(out, lse, state)`` of packed sequences: ``q`` ``(rows, heads, d)``,
        ``k``, ``v`` ``(rows, kv_heads, d)``, sequence ``i`` rows
        ``seqs.cu_seqlens[i] .. [i + 1]``; ``out`` like ``q``, ``lse`` ``(rows, heads)``."""
        ...

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
        """``(dq, dk, dv)`` of :meth:`forward_varlen`, given the (merged) ``out``, ``lse``."""
        ...


class IntoPlaceBackend(Backend, Protocol):
    """A backend whose kernels also write into caller-given strided tensors:
    grouped-head problems then need no copy of their output and gradients into
    place. ``out``, ``dq``, ``dk``, ``dv`` are ``(batch, heads, len, head_dim)``
    views within the backend's ``strides``; no bias."""

    def forward_into(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, out: Tensor
    ) -> tuple[Tensor, Any]:
        """Writes the output into ``out``; returns ``(lse, state)``."""
        ...

    def backward_into(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        causal: bool,
        scale: float,
        state: Any,
        grads: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        """Writes ``(dq, dk, dv)`` into ``grads``."""
        ...


class KernelBackend:
    """Base of the registry's backends: what a kernel supports, declared as data
    (the model is xformers' ``AttentionOpBase`` with its ``SUPPORTED_*``
    attributes) and judged by one :meth:`not_supported_reasons`. An optional
    package is data too (``PACKAGE``, ``EXTRA``, ``TESTED_RELEASES``): absent, it
    is the only reason (:meth:`missing_reasons`); an untested release is refused
    (:meth:`release_reasons`). A backend adds code only for its quirks: how its
    package's release is read (:meth:`package_version`), other release checks
    (a changed private schema) and :meth:`quirk_reasons` (anything else)."""

    name: ClassVar[str]
    description: ClassVar[str]
    strides: ClassVar[StrideRule] = ANY_STRIDES
    #: device types it runs on (None: any)
    SUPPORTED_DEVICES: ClassVar[tuple[str, ...] | None] = ("cuda",)
    #: dtypes it takes (None: any floating-point dtype)
    SUPPORTED_DTYPES: ClassVar[tuple[torch.dtype, ...] | None] = (torch.float16, torch.bfloat16)
    MIN_COMPUTE_CAPABILITY: ClassVar[tuple[int, int] | None] = None
    #: head_dim must be a multiple of this, in [HEAD_DIM_MULTIPLE, MAX_HEAD_DIM]
    HEAD_DIM_MULTIPLE: ClassVar[int] = 1
    MAX_HEAD_DIM: ClassVar[int | None] = None
    SUPPORTS_BIAS: ClassVar[bool] = True
    WRITES_INTO_PLACE: ClassVar[bool] = False
    #: takes key/value with fewer heads than the query (query head j reads
    #: key/value head j // (heads // kv_heads)) and returns their gradients
    #: summed per key/value head; else the fused path repeats them per call
    SUPPORTS_GQA: ClassVar[bool] = False
    #: takes a value head_dim other than the query's (within the same head_dim
    #: bounds), returning outputs and value gradients of the value's head_dim
    SUPPORTS_VALUE_HEAD_DIM: ClassVar[bool] = False
    #: packed sequences in one call: "native" overrides :meth:`forward_varlen` and
    #: :meth:`backward_varlen`; "padded" uses this class's (batches of padded
    #: sequences through :meth:`forward`/:meth:`backward`, which needs a bias
    #: for calls without causality); None: no varlen form
    VARLEN: ClassVar[VarlenForm] = None
    #: "auto" passes over it for calls of fewer query tokens (batch·seq) than this,
    #: where its host time per kernel call costs more than its kernels save, and
    #: takes it only where no later backend can run; a named backend runs any call
    AUTO_MIN_TOKENS: ClassVar[int] = 0

    #: the optional package it runs on (its PyPI name) and the extra of this library
    #: that installs it; None: its kernels come with torch
    PACKAGE: ClassVar[str | None] = None
    EXTRA: ClassVar[str | None] = None
    #: releases of ``PACKAGE`` it ran against on a GPU; any other is refused (empty:
    #: every release is taken, a public API)
    TESTED_RELEASES: ClassVar[tuple[str, ...]] = ()
    #: what the refusal of an untested release adds: why releases differ
    UNTESTED_WHY: ClassVar[str] = ""

    def package_version(self) -> str | None:
        """The installed release of ``PACKAGE``; None where it is not installed."""
        return None

    def missing_reasons(self) -> list[str]:
        """Why it cannot run at all here: ``PACKAGE`` is not installed."""
        if self.PACKAGE is None or self.package_version() is not None:
            return []
        return [f'{self.PACKAGE} is not installed (pip install "torch-dilated-attention[{self.EXTRA}]")']

    def replay_state(self, length: int, device: torch.device) -> Any:
        """The state :meth:`forward` returns for a ``length``-row problem, rebuilt
        without running it (there is no dropout on the fused path): what the
        backward of a registered operator passes, which gets only tensors."""
        return None

    def release_reasons(self) -> list[str]:
        """Why the installed release cannot be trusted: not one of ``TESTED_RELEASES``
        (a backend on private entry points adds its own checks)."""
        version = self.package_version()
        if not self.TESTED_RELEASES or version in self.TESTED_RELEASES:
            return []
        tested = ", ".join(self.TESTED_RELEASES)
        return [f"{self.PACKAGE} {version} is untested here (tested: {tested}){self.UNTESTED_WHY}"]

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        """Reasons beyond the declared data; ``reasons``: those found so far."""
        return []

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        """Empty when the backend can run ``spec``; else why not, one reason each."""
        missing = self.missing_reasons()
        if missing:
            return missing
        reasons = self.release_reasons()
        devices = self.SUPPORTED_DEVICES
        if devices is not None and spec.device_type not in devices:
            return [*reasons, f"runs on {' and '.join(devices)} only, got device {spec.device_type}"]
        cc = spec.compute_capability
        if self.MIN_COMPUTE_CAPABILITY is not None and cc is not None and cc < self.MIN_COMPUTE_CAPABILITY:
            reasons.append(f"needs compute capability >= {self.MIN_COMPUTE_CAPABILITY}, got {cc}")
        dtypes = self.SUPPORTED_DTYPES
        if dtypes is None and not spec.dtype.is_floating_point:
            reasons.append(f"dtype {spec.dtype} is not a floating-point type")
        elif dtypes is not None and spec.dtype not in dtypes:
            reasons.append(f"dtype {spec.dtype} not supported (supports {', '.join(map(str, dtypes))})")
        value_dim = spec.value_head_dim
        other_value_dim = value_dim is not None and value_dim != spec.head_dim
        multiple, largest = self.HEAD_DIM_MULTIPLE, self.MAX_HEAD_DIM
        bounds = f" in [{multiple}, {largest}]" if largest is not None else ""
        dims = [("head_dim", spec.head_dim)]
        if value_dim is not None and other_value_dim:
            dims.append(("value head_dim", value_dim))
        for what, dim in dims:
            if dim % multiple or (largest is not None and not multiple <= dim <= largest):
                reasons.append(f"{what} must be a multiple of {multiple}{bounds}, got {dim}")
        if spec.has_bias and not self.SUPPORTS_BIAS:
            reasons.append("takes no attention bias (key_padding_mask / attn_mask)")
        if spec.varlen and self.VARLEN is None:
            reasons.append("has no varlen form (packed sequences in one call)")
        if other_value_dim and not self.SUPPORTS_VALUE_HEAD_DIM:
            reasons.append(
                f"value head_dim must equal the query's ({spec.head_dim}), got {value_dim}: this backend "
                "runs its kernels on one head_dim (method='gather' runs any)"
            )
        return reasons + self.quirk_reasons(spec, reasons)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        raise NotImplementedError

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        bias: Tensor | None,
        causal: bool,
        scale: float,
        state: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, seqs: PackedSequences, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        """The "padded" form: one :meth:`forward` per length bucket."""
        out = q.new_empty(q.shape[:2] + v.shape[2:])
        lse = q.new_empty(q.shape[:2], dtype=accumulation_dtype(q.dtype))
        states = []
        for bucket in seqs.padded_buckets:
            bias = None if causal else bucket.key_bias(q.dtype)
            bq, bk, bv = (bucket.batch(x) for x in (q, k, v))
            part_out, part_lse, state = self.forward(bq, bk, bv, bias, causal, scale)
            bucket.put(out, part_out)
            bucket.put(lse, part_lse)
            states.append(state)
        return out, lse, states

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
        """The "padded" form: one :meth:`backward` per length bucket (``state``:
        the forward's, or None after a replay)."""
        grads = [torch.empty_like(x) for x in (q, k, v)]
        groups = seqs.padded_buckets
        states = state if state is not None else [self.replay_state(g.length, q.device) for g in groups]
        for bucket, part_state in zip(groups, states):
            bias = None if causal else bucket.key_bias(q.dtype)
            # padded rows get lse 0: their queries are 0, so every score is 0, p <= 1
            lse_batch = bucket.batch(lse[..., None])[..., 0]
            bdo, bq, bk, bv, bo = (bucket.batch(x) for x in (grad_out, q, k, v, out))
            parts = self.backward(bdo, bq, bk, bv, bo, lse_batch, bias, causal, scale, part_state)
            for dest, part in zip(grads, parts):
                bucket.put(dest, part)
        return grads[0], grads[1], grads[2]


#: ``(dq, dk, dv)``
Grads = tuple[Tensor, Tensor, Tensor]


class DestinationKernelBackend(KernelBackend):
    """A :class:`KernelBackend` whose kernels take optional destinations: it defines
    :meth:`run_forward` and :meth:`run_backward`, and this class gives the four
    calls of :class:`IntoPlaceBackend` from them (no bias, no state)."""

    SUPPORTS_BIAS = False
    WRITES_INTO_PLACE = True

    def run_forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, out: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(out, lse)``; the output written into ``out`` if given."""
        raise NotImplementedError

    def run_backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     causal: bool, scale: float, grads: Grads | None) -> Grads:  # fmt: skip
        """``(dq, dk, dv)``; written into ``grads`` if given."""
        raise NotImplementedError

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        out, lse = self.run_forward(q, k, v, causal, scale, None)
        return out, lse, None

    def backward(self, grad_out, q, k, v, out, lse, bias, causal, scale, state):
        return self.run_backward(grad_out, q, k, v, out, lse, causal, scale, None)

    def forward_into(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, out: Tensor):
        return self.run_forward(q, k, v, causal, scale, out)[1], None

    def backward_into(self, grad_out, q, k, v, out, lse, causal, scale, state, grads) -> None:
        self.run_backward(grad_out, q, k, v, out, lse, causal, scale, grads)


def distribution_version(import_name: str, distribution: str) -> str | None:
    """Version of the optional package ``distribution`` when ``import_name`` can be
    imported from it, else None. Imports nothing."""
    if importlib.util.find_spec(import_name) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
