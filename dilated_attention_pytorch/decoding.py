"""Incremental decoding: a key/value cache that keeps only what dilated
attention can still read, and the attention of one new query over it.

A causal query at position ``p`` reads, in branch ``i``, only keys of its own
segment ``[s·w_i, p]`` whose index in the segment has the query's residue
``o = (p - s·w_i) mod r_i``, and only heads with offset ``o`` take part. So
branch ``i`` keeps, per head, one slot per selected position of a segment:
``ceil(w_i / r_i)`` slots, slot ``t // r_i`` holding the key at index ``t``.
A slot is overwritten by the next segment before any query can read it (a
query at index ``t`` reads slots ``0 .. t // r_i``, all written in its own
segment), so nothing is ever cleared and the cache never grows: per layer it
holds ``Σ_i ceil(w_i / r_i)`` slots per head of the branch, and one decoding
step costs the same whatever the number of tokens already generated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import accumulation_dtype
from .core.merge import merge_by_lse
from .pattern import DilatedPattern


class LayerKVCache:
    """Keys and values of one attention layer, per branch ``(batch, slots, heads_i, head_dim)``.

    ``length`` is the number of positions written so far (the next position).
    Buffers are allocated on the first :meth:`append`, with its batch, device and dtype.
    """

    def __init__(self, pattern: DilatedPattern, num_heads: int) -> None:
        self.pattern = pattern
        self.num_heads = num_heads
        self.length = 0
        # per branch: the heads using it, a contiguous range (all heads in "all" mode,
        # the group in grouped mode), and which of them use each offset
        self._heads: list[range] = []
        self._by_offset: list[dict[int, range]] = []
        for i in range(pattern.num_branches):
            pairs = pattern.branch_heads(i, num_heads)
            used = sorted(j for _, heads in pairs for j in heads)
            self._heads.append(range(used[0], used[-1] + 1) if used else range(0))
            self._by_offset.append(dict(pairs))
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def _allocate(self, key: Tensor, value: Tensor) -> None:
        b, _, h, d = key.shape
        if h != self.num_heads:
            raise ValueError(f"key must have {self.num_heads} heads, got {h}")
        for (w, r), heads in zip(zip(self.pattern.segment_lengths, self.pattern.dilation_rates), self._heads):
            slots = math.ceil(w / r)
            self.keys.append(key.new_zeros(b, slots, len(heads), d))
            self.values.append(value.new_zeros(b, slots, len(heads), value.shape[-1]))

    def _selected(self, branch: int, residue: int) -> tuple[slice, slice] | None:
        """Heads of ``branch`` whose offset is ``residue``, as a slice into the
        branch's buffer and a slice into the layer's heads (None if none)."""
        heads = self._by_offset[branch].get(residue)
        if heads is None or not len(heads):
            return None
        first = self._heads[branch].start
        return (
            slice(heads.start - first, heads.stop - first, heads.step),
            slice(heads.start, heads.stop, heads.step),
        )

    @staticmethod
    def _residue_span(first: int, stop: int, residue: int, r: int) -> tuple[slice, slice] | None:
        """Indices ``first <= t < stop`` of a segment with ``t % r == residue``: their
        slots in the branch buffer (slot ``t // r``) and their indices, or None."""
        t0 = first + (residue - first) % r  # first index >= first with this residue
        if t0 >= stop:
            return None
        count = len(range(t0, stop, r))
        return slice(t0 // r, t0 // r + count), slice(t0, stop, r)

    def append(self, key: Tensor, value: Tensor) -> None:
        """Write ``key``/``value`` ``(batch, m, heads, head_dim)`` at positions
        ``length .. length + m - 1``. Only the last segment of each branch is kept."""
        if not self.keys:
            self._allocate(key, value)
        elif key.shape[0] != self.keys[0].shape[0]:
            raise ValueError(f"key has batch {key.shape[0]}, the cache holds batch {self.keys[0].shape[0]}")
        start, m = self.length, key.shape[1]
        end = start + m
        for i, (w, r) in enumerate(zip(self.pattern.segment_lengths, self.pattern.dilation_rates)):
            segment_start = ((end - 1) // w) * w
            first = max(start, segment_start) - segment_start
            stop = end - segment_start
            # one step writes one residue; a prefill every residue of the last segment
            residues = [first % r] if m == 1 else range(r)
            for residue in residues:
                selected = self._selected(i, residue)
                span = self._residue_span(first, stop, residue, r)
                if selected is None or span is None:
                    continue
                (local, layer), (slots, index) = selected, span
                rows = slice(index.start + segment_start - start, index.stop + segment_start - start, r)
                self.keys[i][:, slots, local] = key[:, rows, layer]
                self.values[i][:, slots, local] = value[:, rows, layer]
        self.length = end

    def window_start(self) -> int:
        """The first position of :meth:`window`: the last multiple of the segment
        lengths' least common multiple at or before ``length``, where every branch
        starts a segment (so positions relative to it keep the pattern)."""
        period = math.lcm(*self.pattern.segment_lengths)
        return (self.length // period) * period

    def window(self, start: int | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``start .. length - 1`` (default
        :meth:`window_start`), ``(batch, length - start, heads, head_dim)``: every
        position a causal query at ``length`` or later can still read is filled
        (from whichever branch keeps it), the rest are zeros no such query reads.
        With the new positions' keys appended after it, it is the key sequence of a
        chunk of queries that continues the cache (chunked prefill)."""
        if not self.keys:
            raise ValueError("the cache is empty: nothing to continue from")
        start = self.window_start() if start is None else start
        n = self.length
        if start % math.lcm(*self.pattern.segment_lengths) or not 0 <= start <= n:
            raise ValueError(f"start must be a multiple of lcm(segment_lengths) in [0, {n}], got {start}")
        b, d, dv = self.keys[0].shape[0], self.keys[0].shape[-1], self.values[0].shape[-1]
        keys = self.keys[0].new_zeros(b, n - start, self.num_heads, d)
        values = self.values[0].new_zeros(b, n - start, self.num_heads, dv)
        for i, (w, r) in enumerate(zip(self.pattern.segment_lengths, self.pattern.dilation_rates)):
            segment_start = (n // w) * w
            if segment_start == n:  # position n starts a segment: nothing kept is read again
                continue
            for residue in range(r):
                selected = self._selected(i, residue)
                span = self._residue_span(0, n - segment_start, residue, r)
                if selected is None or span is None:
                    continue
                (local, layer), (slots, index) = selected, span
                rows = slice(index.start + segment_start - start, index.stop + segment_start - start, r)
                keys[:, rows, layer] = self.keys[i][:, slots, local]
                values[:, rows, layer] = self.values[i][:, slots, local]
        return keys, values

    def attend(self, query: Tensor, softmax_scale: float | None = None) -> Tensor:
        """Causal dilated attention of ``query`` ``(batch, 1, heads, head_dim)`` at
        position ``length - 1`` over the cached keys; returns ``(batch, 1, heads, head_dim)``."""
        if self.length == 0:
            raise ValueError("the cache is empty: append the query's own key and value first")
        b, m, h, d = query.shape
        if m != 1 or h != self.num_heads:
            raise ValueError(
                f"query must have shape (batch, 1, {self.num_heads}, head_dim), got {tuple(query.shape)}"
            )
        p = self.length - 1
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
        compute = accumulation_dtype(query.dtype)
        q = query[:, 0].to(compute) * scale
        outs, lses = [], []
        for i, (w, r) in enumerate(zip(self.pattern.segment_lengths, self.pattern.dilation_rates)):
            out = q.new_zeros(b, h, self.values[i].shape[-1])
            lse = q.new_full((b, h), -math.inf)
            t = p % w
            selected = self._selected(i, t % r)
            if selected is not None:
                local, layer = selected
                k = self.keys[i][:, : t // r + 1, local].to(compute)  # (b, slots, heads, d)
                v = self.values[i][:, : t // r + 1, local].to(compute)
                scores = torch.einsum("bhd,bshd->bhs", q[:, layer], k)
                branch_lse = torch.logsumexp(scores, dim=-1)
                out[:, layer] = torch.einsum("bhs,bshd->bhd", torch.exp(scores - branch_lse[..., None]), v)
                lse[:, layer] = branch_lse
            outs.append(out)
            lses.append(lse)
        merged, _ = merge_by_lse(outs, lses)
        return merged[:, None].to(query.dtype)

    def nbytes(self) -> int:
        """Bytes held by the cache buffers (constant once allocated)."""
        return sum(x.numel() * x.element_size() for x in (*self.keys, *self.values))


class DilatedKVCache:
    """One :class:`LayerKVCache` per layer of a model; ``length`` tokens seen."""

    def __init__(self, pattern: DilatedPattern, num_heads: int, num_layers: int) -> None:
        self.layers = [LayerKVCache(pattern, num_heads) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["DilatedKVCache", "LayerKVCache"]
