"""Relative positions applied to queries and keys: rotary (RoPE) and xPos.

Both act on ``(batch, seq, heads, head_dim)`` tensors after the projections
and before dilated attention, at absolute positions ``offset + arange(seq)``,
so a full forward, a sequence shard (``offset`` = the shard's start) and one
decoding step (``offset`` = the step's position) see the same encoding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ._checks import accumulation_dtype, check_int

PositionKind = Literal["rotary", "xpos"]
POSITION_KINDS: tuple[str, ...] = ("rotary", "xpos")


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer): dimension pairs ``(i, i + d/2)`` of
    queries and keys rotate by ``position · base^(-2i/d)``, so ``q·k`` depends on
    positions only through their difference.

    Angles are computed in float64 and reduced mod 2π; the rotation is applied in
    float32 (float64 for float64 inputs) before casting back.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int for rotary positions, got {head_dim!r}")
        if not base > 1.0:
            raise ValueError(f"base must be > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)

    def _angles(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """``(seq, head_dim/2)`` angles for integer ``positions``, reduced mod 2π in
        float64: a float32 product at position 10⁶ would be off by ~0.03 rad."""
        half = self.head_dim // 2
        inv_freq = self.base ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
        angles = positions.to(torch.float64)[:, None] * inv_freq
        return torch.remainder(angles, 2 * math.pi).to(dtype)

    def _factors(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """cos, sin ``(seq, 1, head_dim)`` and an optional per-position scale of
        the queries (keys get its inverse)."""
        angles = self._angles(positions, dtype)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin(), None

    def forward(self, query: Tensor, key: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Encode ``key`` ``(batch, seqlen_k, kv_heads, head_dim)`` at positions
        ``offset .. offset + seqlen_k - 1`` and ``query`` ``(batch, seqlen_q, heads,
        head_dim)``, ``seqlen_q <= seqlen_k``, at the last ``seqlen_q`` of them."""
        if query.shape[-1] != self.head_dim or key.shape[-1] != self.head_dim:
            raise ValueError(
                f"query and key must have head_dim {self.head_dim}, got {query.shape[-1]} and {key.shape[-1]}"
            )
        n_q, n_k = query.shape[1], key.shape[1]
        if n_q > n_k:
            raise ValueError(
                f"query must not be longer than key (the queries are the last positions), got {n_q} and {n_k}"
            )
        compute = accumulation_dtype(query.dtype)
        positions = torch.arange(offset, offset + n_k, device=query.device)
        cos, sin, scale = self._factors(positions, compute)
        self._check_range(query.dtype)

        def encode(x: Tensor, factor: Tensor | None) -> Tensor:
            rows = slice(n_k - x.shape[1], None)
            y = x.to(compute)
            y = y * cos[rows] + _rotate_half(y) * sin[rows]
            if factor is not None:
                y = y * factor[rows]
            return y.to(x.dtype)

        return encode(query, scale), encode(key, None if scale is None else scale.reciprocal())

    def _check_range(self, dtype: torch.dtype) -> None:
        """Raise if the encoding cannot be represented in ``dtype`` (rotary always can)."""

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


class XPos(RotaryEmbedding):
    """xPos (Sun et al., 2022; LongNet's position encoding): rotary plus a decay.
    Dimension pair ``i`` of a query at position ``p`` is scaled by
    ``ζ_i^((p - c)/scale_base)`` and of a key by ``ζ_i^(-(p - c)/scale_base)``,
    ``ζ_i = (2i/d + 0.4) / 1.4``, so the score of a query and an earlier key decays
    with their distance.

    The product only depends on ``p_query - p_key`` if both use the same centre
    ``c``. A global centre would overflow at long lengths (``ζ^(n/scale_base)``),
    so ``c`` is the middle of the ``segment_length`` block that holds the
    position: every pair that dilated attention scores lies in one segment of
    the largest branch, and every other segment length must divide it (checked
    by the modules), so both ends share ``c`` and the exponent stays below
    ``segment_length / (2·scale_base)``.
    """

    def __init__(
        self, head_dim: int, segment_length: int, base: float = 10000.0, scale_base: float = 512.0
    ) -> None:
        super().__init__(head_dim, base)
        check_int("segment_length", segment_length)
        if not scale_base > 0:
            raise ValueError(f"scale_base must be > 0, got {scale_base!r}")
        self.segment_length = segment_length
        self.scale_base = float(scale_base)

    def _factors(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        cos, sin, _ = super()._factors(positions, dtype)
        half = self.head_dim // 2
        zeta = (torch.arange(half, device=positions.device, dtype=dtype) / half + 0.4) / 1.4
        w = self.segment_length
        centre = (positions // w) * w + w / 2
        exponent = (positions.to(dtype) - centre.to(dtype)) / self.scale_base
        scale = zeta ** exponent[:, None]
        return cos, sin, torch.cat((scale, scale), dim=-1)[:, None, :]

    def log_max_scale(self) -> float:
        """Natural log of the largest factor applied (to keys at a segment's start)."""
        return (self.segment_length / 2) / self.scale_base * -math.log(0.4 / 1.4)

    def _check_range(self, dtype: torch.dtype) -> None:
        if dtype == torch.float64:
            return
        # factors are made in float32 and applied in dtype; keep headroom for |q|, |k| up to 256
        limit = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 2**8
        if self.log_max_scale() > math.log(limit):
            raise ValueError(
                f"xpos scales keys by up to exp({self.log_max_scale():.1f}) with segment_length "
                f"{self.segment_length} and scale_base {self.scale_base:g}, which overflows {dtype}; "
                "use a wider dtype, a larger scale_base, shorter segments or rotary positions"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segment_length={self.segment_length}, scale_base={self.scale_base:g}"


def make_position_embedding(
    kind: PositionKind | nn.Module | None, head_dim: int, segment_lengths: tuple[int, ...]
) -> nn.Module | None:
    """``None``, ``"rotary"``, ``"xpos"`` (centred per largest segment) or a ready module."""
    if kind is None or isinstance(kind, nn.Module):
        return kind
    if kind == "rotary":
        return RotaryEmbedding(head_dim)
    if kind == "xpos":
        largest = max(segment_lengths)
        not_dividing = [w for w in segment_lengths if largest % w]
        if not_dividing:
            raise ValueError(
                "position_embedding='xpos' needs every segment length to divide the largest "
                f"({largest}) so that scored pairs share a centre; {not_dividing} do not"
            )
        return XPos(head_dim, segment_length=largest)
    raise ValueError(
        f"position_embedding must be None, one of {list(POSITION_KINDS)} or an nn.Module, got {kind!r}"
    )
