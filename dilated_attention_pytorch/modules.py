"""Core modules: ``(batch, seq, heads, head_dim)`` in and out. Thin wrappers
over :func:`dilated_attention_pytorch.functional.dilated_attention`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._checks import Method, canonical_mask, check_dropout, check_scale, refuse_torchscript
from .functional import _dilated_attention, dilated_attention_varlen
from .pattern import DilatedPattern, HeadMode
from .reference import DEFAULT_MAX_BYTES, dilated_attention_reference


class _DilatedAttentionBase(nn.Module):
    method: ClassVar[Method]
    #: set by the factories: what "auto" chose and why (``AutoChoice``), None otherwise
    auto_choice: Any = None
    #: warn when an input looks like an SDPA-layout ``(batch, heads, seq, head_dim)`` tensor;
    #: the multihead modules turn it off (their projections fix the layout)
    warn_layout: bool = True

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        head_mode: HeadMode = "grouped",
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.pattern = DilatedPattern(segment_lengths, dilation_rates, head_mode)
        check_scale(softmax_scale)
        check_dropout(attention_dropout, "attention_dropout")
        self.softmax_scale = softmax_scale
        self.attention_dropout = attention_dropout
        self.backend = backend

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return self.pattern.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return self.pattern.dilation_rates

    @property
    def head_mode(self) -> HeadMode:
        return self.pattern.head_mode

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """``query`` ``(batch, seqlen_q, heads, head_dim)``, ``key``/``value``
        ``(batch, seqlen_k, kv_heads, head_dim)`` (``heads % kv_heads == 0``,
        ``seqlen_q <= seqlen_k``: the queries are the last positions); returns
        ``(batch, seqlen_q, heads, head_dim)``. Not ``(batch, heads, seq,
        head_dim)``, SDPA's layout: transpose such tensors first.

        ``key_padding_mask``: ``(batch, seqlen_k)``, True = ignore. ``attn_mask``:
        ``(seqlen_q, seqlen_k)`` or ``(batch | 1, heads | 1, seqlen_q, seqlen_k)``,
        bool True = not allowed (as in ``nn.MultiheadAttention``) or additive float.
        ``cu_seqlens``/``max_seqlen``: packed documents (see
        :func:`~dilated_attention_pytorch.functional.dilated_attention_varlen`):
        inputs ``(total_tokens, heads, head_dim)``, no masks.
        """
        if cu_seqlens is not None:
            if key_padding_mask is not None or attn_mask is not None:
                raise ValueError(
                    "key_padding_mask and attn_mask are not taken with cu_seqlens (packed documents): each "
                    "document is a whole sequence; leave padding out of the packing"
                )
            return self._attend_packed(query, key, value, cu_seqlens, max_seqlen, is_causal)
        return self._attend(
            query,
            key,
            value,
            self.pattern,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            softmax_scale=self.softmax_scale,
        )

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, pattern: DilatedPattern, **kwargs: Any
    ) -> Tensor:
        refuse_torchscript()
        return _dilated_attention(
            query, key, value, pattern, method=self.method, backend=self.backend,
            warn_layout=self.warn_layout, **kwargs,
        )  # fmt: skip

    def _attend_packed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int | None,
        causal: bool,
    ) -> Tensor:
        return dilated_attention_varlen(
            query, key, value, cu_seqlens, max_seqlen, self.pattern, is_causal=causal,
            dropout_p=self.attention_dropout if self.training else 0.0, softmax_scale=self.softmax_scale,
            method=self.method, backend=self.backend,
        )  # fmt: skip

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_torchscript(scripting=True)
        return self

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
        """The output and the exact dense weights ``(batch, heads, seq, seq)`` of the
        function this module computes (no dropout), from the O(seq²) reference;
        refused above ``max_bytes`` of estimated memory (None: no limit)."""
        if key_padding_mask is not None:
            key_padding_mask = canonical_mask(key_padding_mask, "key_padding_mask")
        if attn_mask is not None:
            attn_mask = canonical_mask(attn_mask, "attn_mask")
        return dilated_attention_reference(  # type: ignore[return-value]
            query,
            key,
            value,
            self.segment_lengths,
            self.dilation_rates,
            head_mode=self.head_mode,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            softmax_scale=self.softmax_scale,
            return_weights=True,
            max_bytes=max_bytes,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"head_mode={self.head_mode!r}, attention_dropout={self.attention_dropout}"
        )


class DilatedAttention(_DilatedAttentionBase):
    """LongNet dilated attention, the readable way: each branch copy-gathers its
    positions, runs plain torch attention and scatters back. Supports every
    option; slower and hungrier than :class:`ImprovedDilatedAttention`.
    Tensors are ``(batch, seq, heads, head_dim)`` in and out (flash-attn's
    layout, not SDPA's ``(batch, heads, seq, head_dim)``)."""

    method = "gather"


class ImprovedDilatedAttention(_DilatedAttentionBase):
    """LongNet dilated attention on fused kernels: strided views (no copies),
    one lse-returning kernel call per branch and offset, outputs and gradients
    written in place. ``backend`` forces a kernel (see ``kernels.REGISTRY``).
    Dropout runs the gather path. Tensors are ``(batch, seq, heads, head_dim)``
    in and out (flash-attn's layout, not SDPA's ``(batch, heads, seq, head_dim)``)."""

    method = "fused"


class RingDilatedAttention(_DilatedAttentionBase):
    """Dilated attention of a sequence sharded over ``torch.distributed`` ranks.

    Each rank passes its contiguous shard ``(batch, seq / P, heads, head_dim)``
    (rank ``i`` holds positions ``[i·seq/P, (i+1)·seq/P)``) and gets its shard of
    the output. Branches whose segments fit in a shard run locally; a segment
    spanning shards gathers only its dilated keys/values, among the ranks that
    share it. ``process_group`` defaults to the world; or ``device_mesh`` and its
    sequence-parallel ``mesh_dim``. ``exchange``: how those
    ranks bring the keys together, ``"all_gather"`` or ``"ring"`` (rotation
    with ``batch_isend_irecv``, two blocks held at a time), or ``"ulysses"``:
    head parallelism instead (an all-to-all gives each rank the whole sequence
    of ``heads / P`` heads), with ``ring_group``/``ring_exchange`` the hybrid of
    both (see :func:`~dilated_attention_pytorch.distributed.ring_dilated_attention`).
    ``attn_mask`` is not supported (use ``key_padding_mask`` shards and ``is_causal``).
    """

    method = "fused"

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        head_mode: HeadMode = "grouped",
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str | None = None,
        process_group: Any = None,
        exchange: str = "all_gather",
        device_mesh: Any = None,
        mesh_dim: int | str | None = None,
        ring_group: Any = None,
        ring_exchange: str = "all_gather",
    ) -> None:
        from .distributed.checks import check_exchange, group_of

        super().__init__(
            segment_lengths,
            dilation_rates,
            head_mode=head_mode,
            softmax_scale=softmax_scale,
            attention_dropout=attention_dropout,
            backend=backend,
        )
        self.process_group = group_of(process_group, device_mesh, mesh_dim)
        self.exchange = check_exchange(exchange)
        #: with exchange="ulysses": the group the sequence is also split over (the hybrid)
        self.ring_group = ring_group
        self.ring_exchange = check_exchange(ring_exchange)

    @property
    def sharded(self) -> bool:
        """Whether each rank holds a shard of the sequence (torch.distributed is up)."""
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def dense_weights(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise ValueError(
            f"need_weights=True is not supported by {type(self).__name__} (dense_weights): the weights "
            "of one query of a sharded sequence live on several ranks"
        )

    def _attend_packed(self, *args: Any) -> Tensor:
        raise NotImplementedError(
            f"packed documents (cu_seqlens) are not supported by {type(self).__name__}: a document may "
            "span ranks. Shard whole documents per rank (data parallelism), or pad them to sequences"
        )

    def _attend(self, *args: Any, **kwargs: Any) -> Tensor:
        from .distributed import ring_dilated_attention

        return ring_dilated_attention(
            *args, method=self.method, backend=self.backend, process_group=self.process_group,
            exchange=self.exchange, ring_group=self.ring_group, ring_exchange=self.ring_exchange, **kwargs,
        )  # fmt: skip
