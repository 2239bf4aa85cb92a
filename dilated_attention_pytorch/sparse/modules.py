"""The block-sparse modules: dilated attention restricted to a fixed or a
content-chosen block layout, and its ``nn.MultiheadAttention`` drop-in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._cache import BoundedCache
from .._checks import accumulation_dtype, mask_to_bias, validate_call
from ..functional import Method, dilated_attention
from ..modules import _DilatedAttentionBase
from ..multihead import _MultiheadDilatedAttentionBase
from ..pattern import DilatedPattern, HeadMode
from ..reference import DEFAULT_MAX_BYTES
from . import flex, layouts
from .block_layout import as_4d, layout_bias

#: layouts a block-sparse module keeps, one per (length, causal, device) seen last
LAYOUT_CACHE_SIZE = 32


class _BlockSparseBase(_DilatedAttentionBase):
    """Dilated attention further restricted to a block layout (see
    :mod:`dilated_attention_pytorch.sparse.layouts`). Runs on FlexAttention on
    CUDA (``backend="flex"``) and on the exact copy-gather path elsewhere, or
    with dropout in training (``backend="gather"``); ``backend=None`` picks
    (:meth:`_method`, per call)."""

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        block_size: int = 128,
        sparsity: float = 0.9,
        head_mode: HeadMode = "grouped",
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str | None = None,
        process_group: Any = None,
        device_mesh: Any = None,
        mesh_dim: int | str | None = None,
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            head_mode=head_mode,
            softmax_scale=softmax_scale,
            attention_dropout=attention_dropout,
        )
        layouts.check_block_size(block_size)
        layouts.check_sparsity(sparsity)
        if backend not in (None, "flex", "gather"):
            raise ValueError(
                f"backend of a block-sparse module must be None, 'flex' or 'gather', got {backend!r}"
            )
        self._block_size = block_size
        self._sparsity = float(sparsity)
        self.backend = backend
        if device_mesh is not None or mesh_dim is not None:
            from ..distributed.checks import group_of

            process_group = group_of(process_group, device_mesh, mesh_dim)
        self.process_group = process_group

    @property
    def sharded(self) -> bool:
        """Whether each rank holds a shard of the sequence (a ``process_group`` of size > 1)."""
        return self._world_size > 1

    def _attend_packed(self, *args: Any) -> Tensor:
        raise NotImplementedError(
            f"packed documents (cu_seqlens) are not supported by {type(self).__name__}: its block layout "
            "is over the positions of one sequence; pad the documents to sequences of a batch"
        )

    @property
    def _world_size(self) -> int:
        if self.process_group is None:
            return 1
        return torch.distributed.get_world_size(self.process_group)

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, pattern: DilatedPattern, **kwargs: Any
    ) -> Tensor:
        if not self.sharded:
            return self._attend_local(query, key, value, pattern, **kwargs)
        from ..distributed import ring_dilated_attention
        from ..distributed.checks import check_call

        # the layout may take collectives (BlockSparseAdaptive): first every rank's own
        # checks, compared in one collective, so a bad argument raises on every rank
        error: Exception | None = None
        try:
            validate_call(
                query, key, value, kwargs["is_causal"], kwargs["key_padding_mask"], None,
                kwargs["dropout_p"], kwargs["softmax_scale"], "gather",
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            error = exc
        check_call(query, self.process_group, None, error)
        layout = self._layout_for(query, key, kwargs["is_causal"])
        kwargs["method"] = self._method(query, key, value, kwargs["dropout_p"])
        return ring_dilated_attention(
            query,
            key,
            value,
            pattern,
            process_group=self.process_group,
            block_layout=layout,
            block_size=self.block_size,
            **kwargs,
        )

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def sparsity(self) -> float:
        return self._sparsity

    def _method(
        self, query: Tensor, key: Tensor, value: Tensor, dropout_p: float, attn_masked: bool = False
    ) -> Method:
        if self.backend is not None:
            return self.backend  # type: ignore[return-value]
        if dropout_p > 0.0 or query.device.type != "cuda":
            return "gather"
        requires_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        cc = torch.cuda.get_device_capability(query.device)
        reasons = flex.not_supported_reasons("cuda", requires_grad, cc, attn_masked=attn_masked)
        return "gather" if reasons else "flex"

    def _layout_for(self, query: Tensor, key: Tensor, is_causal: bool) -> Tensor:
        raise NotImplementedError

    @property
    def permutes(self) -> bool:
        """Whether positions run in another order than the caller's (see ``_order``)."""
        return False

    def _order(self, seq_len: int, device: torch.device) -> Tensor | None:
        """A permutation of positions to run in (None: the caller's order)."""
        return None

    def _permuted(
        self,
        order: Tensor,
        tensors: Sequence[Tensor],
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        tensors = [x[:, order] for x in tensors]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, order]
        if attn_mask is not None:
            attn_mask = attn_mask[..., order, :][..., order]
        return tensors, key_padding_mask, attn_mask

    def _attend_local(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        pattern: DilatedPattern,
        *,
        is_causal: bool,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        dropout_p: float,
        softmax_scale: float | None,
    ) -> Tensor:
        # check before permuting or building a layout from the inputs (BlockSparseAdaptive),
        # so errors name the caller's arguments, not an operation deep inside
        validate_call(
            query, key, value, is_causal, key_padding_mask, attn_mask, dropout_p, softmax_scale, "flex"
        )
        order = None
        if self.permutes:
            order = self._order(query.shape[1], query.device)
        if order is not None:
            (query, key, value), key_padding_mask, attn_mask = self._permuted(
                order, (query, key, value), key_padding_mask, attn_mask
            )
        layout = self._layout_for(query, key, is_causal)
        out = dilated_attention(
            query,
            key,
            value,
            pattern,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            method=self._method(query, key, value, dropout_p, attn_mask is not None),
            block_layout=layout,
            block_size=self.block_size,
        )
        return out if order is None else out[:, torch.argsort(order)]

    def dense_weights(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> tuple[Tensor, Tensor]:
        if self.sharded:
            raise ValueError(
                "dense_weights (need_weights=True) is not available when the sequence is sharded over a "
                "process_group: the weights of one query live on several ranks"
            )
        n = query.shape[1]
        order = self._order(n, query.device)
        if order is not None:
            (query, key, value), key_padding_mask, attn_mask = self._permuted(
                order, (query, key, value), key_padding_mask, attn_mask
            )
        layout = self._layout_for(query, key, is_causal)
        at = torch.arange(n, device=query.device)
        bias = layout_bias(as_4d(layout), self.block_size, at, at, accumulation_dtype(query.dtype))
        if attn_mask is not None:
            bias = bias + mask_to_bias(attn_mask, bias.dtype, "attn_mask")
        out, weights = super().dense_weights(query, key, value, is_causal, key_padding_mask, bias, max_bytes)
        if order is not None:
            inverse = torch.argsort(order)
            out, weights = out[:, inverse], weights[:, :, inverse][..., inverse]
        return out, weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, sparsity={self.sparsity}"


class BlockSparseRingDilatedAttention(_BlockSparseBase):
    """Dilated attention restricted to a fixed block layout. Tensors are
    ``(batch, seq, heads, head_dim)`` in and out, as in the other core modules.

    ``pattern``: "local_window", "dilated_sparse", "global_local", "random"
    (reproducible from ``seed``), "hilbert" (2-D inputs of ``spatial_shape=(H, W)``,
    positions taken along a Hilbert curve so blocks are 2-D neighbourhoods,
    outputs in the caller's order) or a callable ``fn(n_blocks) -> bool layout``.
    ``sparsity`` is the fraction of blocks skipped (of the causal half when
    causal); the diagonal block is always kept. ``block_layout(seq_len)`` gives
    the layout. With ``sparsity=0`` it equals dense dilated attention.

    ``process_group``: None (default) attends over the sequence each rank is
    given. A group of world size > 1 shards the sequence over it as
    :class:`RingDilatedAttention` does (each rank passes its contiguous shard and
    gets its shard of the output; the layout is over the whole sequence); a
    segment spanning ranks sends each rank only the key/value rows of the blocks
    its queries may see. The default is not the world group, so that data-parallel
    jobs keep their per-rank sequences. Sharded: no "hilbert" pattern (the curve
    order is global) and no ``dense_weights``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        block_size: int = 128,
        pattern: str | layouts.LayoutFn = "dilated_sparse",
        sparsity: float = 0.9,
        seed: int = 0,
        spatial_shape: tuple[int, int] | None = None,
        head_mode: HeadMode = "grouped",
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str | None = None,
        process_group: Any = None,
        device_mesh: Any = None,
        mesh_dim: int | str | None = None,
    ) -> None:
        if (process_group is not None or device_mesh is not None) and pattern == "hilbert":
            raise ValueError(
                "pattern='hilbert' cannot shard the sequence over a process_group (its curve order "
                "mixes positions of every shard); pass process_group=None"
            )
        super().__init__(
            segment_lengths,
            dilation_rates,
            block_size=block_size,
            sparsity=sparsity,
            head_mode=head_mode,
            softmax_scale=softmax_scale,
            attention_dropout=attention_dropout,
            backend=backend,
            process_group=process_group,
            device_mesh=device_mesh,
            mesh_dim=mesh_dim,
        )
        if not callable(pattern) and pattern not in layouts.LAYOUT_PATTERNS:
            raise ValueError(
                f"pattern must be one of {layouts.LAYOUT_PATTERNS} or a callable, got {pattern!r}"
            )
        if (pattern == "hilbert") != (spatial_shape is not None):
            raise ValueError(
                "spatial_shape=(height, width) is required by pattern='hilbert' and only used by it, "
                f"got pattern={pattern!r}, spatial_shape={spatial_shape!r}"
            )
        if spatial_shape is not None:
            if not (isinstance(spatial_shape, (tuple, list)) and len(spatial_shape) == 2):
                raise ValueError(f"spatial_shape must be (height, width), got {spatial_shape!r}")
            layouts.hilbert_order(*spatial_shape)  # validates
            spatial_shape = (spatial_shape[0], spatial_shape[1])
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self._pattern_name = pattern
        self._seed = seed
        self._spatial_shape = spatial_shape
        # bounded: a model that meets many lengths (generation) must not keep them all
        self._layouts: BoundedCache[Tensor] = BoundedCache(LAYOUT_CACHE_SIZE)
        self._orders: BoundedCache[Tensor] = BoundedCache(8)

    @property
    def layout_pattern(self) -> str | layouts.LayoutFn:
        return self._pattern_name

    @property
    def spatial_shape(self) -> tuple[int, int] | None:
        return self._spatial_shape

    def block_layout(
        self, seq_len: int, is_causal: bool = False, device: torch.device | str | None = None
    ) -> Tensor:
        """Bool ``(n_blocks, n_blocks)`` (or per head) layout used for ``seq_len``
        positions, ``n_blocks = ceil(seq_len / block_size)``; for "hilbert" over
        positions in curve order. Cached per length, causality and device."""
        # "cuda" -> "cuda:0", so keys match the devices of tensors
        device = torch.empty(0, device=device if device is not None else "cpu").device
        n = layouts.num_blocks(seq_len, self.block_size)
        return self._layouts.get(
            (seq_len, is_causal, device),
            lambda: layouts.make_layout(
                self._pattern_name, n, self.sparsity, causal=is_causal, seed=self._seed, device=device
            ),
        )

    def _layout_for(self, query: Tensor, key: Tensor, is_causal: bool) -> Tensor:
        return self.block_layout(query.shape[1] * self._world_size, is_causal, query.device)

    @property
    def permutes(self) -> bool:
        return self._spatial_shape is not None

    def _order(self, seq_len: int, device: torch.device) -> Tensor | None:
        if self._spatial_shape is None:
            return None
        height, width = self._spatial_shape
        if seq_len != height * width:
            raise ValueError(
                f"pattern='hilbert' with spatial_shape={self._spatial_shape} needs "
                f"seq = {height * width}, got {seq_len}"
            )
        return self._orders.get(device, lambda: layouts.hilbert_order(height, width, device))

    def extra_repr(self) -> str:
        name = self._pattern_name if isinstance(self._pattern_name, str) else "callable"
        return f"{super().extra_repr()}, pattern={name!r}"


class BlockSparseAdaptive(_BlockSparseBase):
    """Dilated attention over key blocks chosen from the content. Tensors are
    ``(batch, seq, heads, head_dim)`` in and out, as in the other core modules.

    Per batch, head and query block, the key blocks with the highest
    mean-pooled ``q · k`` score are kept (a ``1 - sparsity`` share of the
    candidates, of those at or before the query block when causal), the
    diagonal block always. The choice is not differentiated; attention over the
    chosen blocks is exact and differentiable. ``last_layout()`` gives the
    ``(batch, heads, n_blocks, n_blocks)`` layout of the last forward.

    ``process_group`` shards the sequence as in :class:`BlockSparseRingDilatedAttention`:
    each rank pools its own blocks, scores its query blocks against the pooled
    key blocks of every rank (one all-gather of ``(batch, heads, n_blocks,
    head_dim)``), and the rows are all-gathered so every rank holds the same
    layout (the exchange plan needs it); ``block_size`` must divide the shard.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        block_size: int = 128,
        sparsity: float = 0.9,
        head_mode: HeadMode = "grouped",
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            block_size=block_size,
            sparsity=sparsity,
            head_mode=head_mode,
            softmax_scale=softmax_scale,
            attention_dropout=attention_dropout,
            backend=backend,
            process_group=process_group,
        )
        self._last_layout: Tensor | None = None

    def last_layout(self) -> Tensor | None:
        return self._last_layout

    @torch.no_grad()
    def _layout_for(self, query: Tensor, key: Tensor, is_causal: bool) -> Tensor:
        shard, bs, world = query.shape[1], self.block_size, self._world_size
        if world > 1:
            from ..distributed.all_gather import all_gather_cat

            if shard % bs:
                raise ValueError(
                    f"block_size ({bs}) must divide the shard length ({shard}) when the sequence is "
                    "sharded over a process_group, so that no block straddles two ranks"
                )
        nb_local, nb = layouts.num_blocks(shard, bs), layouts.num_blocks(shard * world, bs)

        def pooled(x: Tensor) -> Tensor:  # (b, n, h, d) -> (b, h, nb, d), mean over each block
            padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, nb_local * bs - shard))
            counts = torch.full((nb_local,), float(bs), device=x.device)
            counts[-1] = shard - (nb_local - 1) * bs
            return (padded.unflatten(1, (nb_local, bs)).sum(2) / counts[:, None, None]).transpose(1, 2)

        keys = pooled(key)
        first = 0
        if world > 1:  # every rank scores its query blocks against every key block
            keys = all_gather_cat(keys, 2, self.process_group)
            first = torch.distributed.get_rank(self.process_group) * nb_local
        # grouped-query attention: each query head scores the key head it reads
        keys = keys.repeat_interleave(query.shape[2] // key.shape[2], dim=1)
        scores = pooled(query) @ keys.transpose(-1, -2)  # (b, h, nb_local, nb)
        q_idx = first + torch.arange(nb_local, device=query.device)
        k_idx = torch.arange(nb, device=query.device)
        candidates = torch.full((nb_local,), nb, device=query.device)
        if is_causal:
            scores = scores.masked_fill(k_idx[None, :] > q_idx[:, None], -math.inf)
            candidates = q_idx + 1
        keep = torch.clamp(torch.ceil((1.0 - self.sparsity) * candidates), min=1)
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        layout = (rank < keep[:, None]) | (k_idx[None, :] == q_idx[:, None])
        if is_causal:
            layout &= k_idx[None, :] <= q_idx[:, None]
        if world > 1:  # the same whole layout on every rank, for the exchange plan
            layout = all_gather_cat(layout.to(torch.uint8), 2, self.process_group).bool()
        self._last_layout = layout
        return layout


class BlockSparseRingMultiheadDilatedAttention(_MultiheadDilatedAttentionBase):
    """:class:`MultiheadDilatedAttention` on :class:`BlockSparseRingDilatedAttention`:
    dilated attention restricted to a block layout. Takes that module's
    ``block_size``, ``pattern``, ``sparsity``, ``seed`` and ``spatial_shape``
    and ``process_group`` (keyword only). ``need_weights=True`` returns the exact
    dense weights of the restricted function (not when sharded over a process
    group); ``self.attention.block_layout(seq_len)`` gives the layout.
    """

    attention_class = BlockSparseRingDilatedAttention
