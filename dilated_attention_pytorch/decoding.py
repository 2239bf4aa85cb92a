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
step costs the same whatever the number of tokens already generated. With
grouped-query attention the slots are per key/value head and residue that the
branch's query heads read (one per key/value head of the branch in grouped
mode), never per query head.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ._checks import accumulation_dtype
from .core.merge import merge_by_lse
from .pattern import DilatedPattern, kv_head


@dataclasses.dataclass(frozen=True)
class _Residue:
    """What one residue of one branch touches: its query heads, the buffer pair
    each reads, and the distinct pairs with their key/value heads."""

    query_heads: list[int]
    pair_of_query: list[int]
    pairs: list[int]
    kv_heads: list[int]


class LayerKVCache:
    """Keys and values of one attention layer, per branch ``(batch, slots, pairs_i, head_dim)``.

    A pair is a key/value head and a residue some query head of the branch reads
    it with (grouped-query attention: query heads sharing a key/value head may
    use different offsets); without sharing, one pair per query head of the
    branch. ``length`` is the number of positions written so far (the next
    position). Buffers are allocated on the first :meth:`append`, with its
    batch, device and dtype.
    """

    def __init__(self, pattern: DilatedPattern, num_heads: int, num_kv_heads: int | None = None) -> None:
        self.pattern = pattern
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads, got num_heads = {num_heads} and "
                f"num_kv_heads = {self.num_kv_heads}"
            )
        self.length = 0
        self._num_pairs: list[int] = []
        self._residues: list[dict[int, _Residue]] = []
        for i in range(pattern.num_branches):
            num_pairs = 0
            residues = {}
            # a residue's pairs are its query heads' distinct key/value heads
            for residue, query_heads in pattern.branch_heads(i, num_heads):
                kv_of_query = [kv_head(j, num_heads, self.num_kv_heads) for j in query_heads]
                kv = sorted(set(kv_of_query))
                pairs = list(range(num_pairs, num_pairs + len(kv)))
                of_query = [num_pairs + kv.index(k) for k in kv_of_query]
                residues[residue] = _Residue(list(query_heads), of_query, pairs, kv)
                num_pairs += len(kv)
            self._num_pairs.append(num_pairs)
            self._residues.append(residues)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def _allocate(self, key: Tensor, value: Tensor) -> None:
        b, _, h, d = key.shape
        if h != self.num_kv_heads:
            raise ValueError(f"key must have {self.num_kv_heads} (key/value) heads, got {h}")
        for (w, r), pairs in zip(
            zip(self.pattern.segment_lengths, self.pattern.dilation_rates), self._num_pairs
        ):
            slots = math.ceil(w / r)
            self.keys.append(key.new_zeros(b, slots, pairs, d))
            self.values.append(value.new_zeros(b, slots, pairs, value.shape[-1]))

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
        """Write ``key``/``value`` ``(batch, m, kv_heads, head_dim)`` at positions
        ``length .. length + m - 1``. Only the last segment of each branch is kept."""
        if not self.keys:
            self._allocate(key, value)
        elif key.shape[0] != self.keys[0].shape[0]:
            raise ValueError(f"key has batch {key.shape[0]}, the cache holds batch {self.keys[0].shape[0]}")
        elif key.shape[2] != self.num_kv_heads:
            raise ValueError(f"key must have {self.num_kv_heads} (key/value) heads, got {key.shape[2]}")
        start, m = self.length, key.shape[1]
        end = start + m
        for i, (w, r) in enumerate(zip(self.pattern.segment_lengths, self.pattern.dilation_rates)):
            segment_start = ((end - 1) // w) * w
            first = max(start, segment_start) - segment_start
            stop = end - segment_start
            # one step writes one residue; a prefill every residue of the last segment
            residues = [first % r] if m == 1 else range(r)
            for residue in residues:
                selected = self._residues[i].get(residue)
                span = self._residue_span(first, stop, residue, r)
                if selected is None or span is None:
                    continue
                slots, index = span
                rows = slice(index.start + segment_start - start, index.stop + segment_start - start, r)
                self.keys[i][:, slots, selected.pairs] = key[:, rows][:, :, selected.kv_heads]
                self.values[i][:, slots, selected.pairs] = value[:, rows][:, :, selected.kv_heads]
        self.length = end

    def window_start(self) -> int:
        """The first position of :meth:`window`: the last multiple of the segment
        lengths' least common multiple at or before ``length``, where every branch
        starts a segment (so positions relative to it keep the pattern)."""
        period = math.lcm(*self.pattern.segment_lengths)
        return (self.length // period) * period

    def window(self, start: int | None = None, next_query_only: bool = False) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``start .. length - 1`` (default
        :meth:`window_start`), ``(batch, length - start, heads, head_dim)``: every
        position a causal query at ``length`` or later can still read is filled
        (from whichever branch keeps it), the rest are zeros no such query reads;
        ``kv_heads`` heads. With the new positions' keys appended after it, it is
        the key sequence of a chunk of queries that continues the cache (chunked
        prefill). ``next_query_only``: fill only the positions the query at
        ``length`` reads (its residue in each branch; a decoding step), the rest
        stay zeros."""
        if not self.keys:
            raise ValueError("the cache is empty: nothing to continue from")
        start = self.window_start() if start is None else start
        n = self.length
        if start % math.lcm(*self.pattern.segment_lengths) or not 0 <= start <= n:
            raise ValueError(f"start must be a multiple of lcm(segment_lengths) in [0, {n}], got {start}")
        b, d, dv = self.keys[0].shape[0], self.keys[0].shape[-1], self.values[0].shape[-1]
        keys = self.keys[0].new_zeros(b, n - start, self.num_kv_heads, d)
        values = self.values[0].new_zeros(b, n - start, self.num_kv_heads, dv)
        for i, (w, r) in enumerate(zip(self.pattern.segment_lengths, self.pattern.dilation_rates)):
            segment_start = (n // w) * w
            if segment_start == n:  # position n starts a segment: nothing kept is read again
                continue
            residues = [(n - segment_start) % r] if next_query_only else range(r)
            for residue in residues:
                selected = self._residues[i].get(residue)
                span = self._residue_span(0, n - segment_start, residue, r)
                if selected is None or span is None:
                    continue
                slots, index = span
                rows = slice(index.start + segment_start - start, index.stop + segment_start - start, r)
                keys[:, rows, selected.kv_heads] = self.keys[i][:, slots][:, :, selected.pairs]
                values[:, rows, selected.kv_heads] = self.values[i][:, slots][:, :, selected.pairs]
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
            selected = self._residues[i].get(t % r)
            if selected is not None:
                heads, pairs = selected.query_heads, selected.pair_of_query
                # (b, slots, heads, d): each query head's pair (a small copy of the cache rows)
                k = self.keys[i][:, : t // r + 1][:, :, pairs].to(compute)
                v = self.values[i][:, : t // r + 1][:, :, pairs].to(compute)
                scores = torch.einsum("bhd,bshd->bhs", q[:, heads], k)
                branch_lse = torch.logsumexp(scores, dim=-1)
                out[:, heads] = torch.einsum("bhs,bshd->bhd", torch.exp(scores - branch_lse[..., None]), v)
                lse[:, heads] = branch_lse
            outs.append(out)
            lses.append(lse)
        merged, _ = merge_by_lse(outs, lses)
        return merged[:, None].to(query.dtype)

    def nbytes(self) -> int:
        """Bytes held by the cache buffers (constant once allocated)."""
        return sum(x.numel() * x.element_size() for x in (*self.keys, *self.values))


class DilatedKVCache:
    """One :class:`LayerKVCache` per layer of a model; ``length`` tokens seen."""

    def __init__(
        self, pattern: DilatedPattern, num_heads: int, num_layers: int, num_kv_heads: int | None = None
    ) -> None:
        self.layers = [LayerKVCache(pattern, num_heads, num_kv_heads) for _ in range(num_layers)]

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
