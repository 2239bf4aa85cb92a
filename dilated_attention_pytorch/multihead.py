"""Drop-in replacements for ``nn.MultiheadAttention`` with dilated attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._checks import check_dropout, check_int, refuse_torchscript
from .core.unbind import unbind
from .decoding import LayerKVCache
from .modules import (
    DilatedAttention,
    ImprovedDilatedAttention,
    RingDilatedAttention,
    _DilatedAttentionBase,
)
from .pattern import LONGNET_DILATION_RATES, LONGNET_SEGMENT_LENGTHS, HeadMode
from .positions import PositionKind, XPos, make_position_embedding
from .reference import DEFAULT_MAX_BYTES


def _keep_transformer_layers_off_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op pre-hook. ``nn.TransformerEncoderLayer`` skips its ``self_attn``
    in eval mode and runs dense attention from ``in_proj_weight`` directly
    (``torch._transformer_encoder_layer_fwd``) unless a hook is attached, which
    would silently drop the dilation."""
    return None


class _MultiheadDilatedAttentionBase(nn.MultiheadAttention):
    """A subclass of ``nn.MultiheadAttention`` with the same parameters, names,
    initialisation and state_dict, so code that special-cases the class (init
    schemes, FSDP wrap policies) treats it as one; only ``forward`` differs.
    ``nn.MultiheadAttention.__init__`` is not run (it would build parameters
    that are then replaced); everything its methods read is set here."""

    #: set by the factories: what "auto" chose and why (``AutoChoice``), None otherwise
    auto_choice: Any = None

    attention_class: ClassVar[type[_DilatedAttentionBase]]

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        head_mode: HeadMode = "grouped",
        layer_norm: bool = False,
        position_embedding: PositionKind | nn.Module | None = None,
        backend: str | None = None,
        max_weights_bytes: int | None = DEFAULT_MAX_BYTES,
        num_kv_heads: int | None = None,
        **attention_kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads (grouped-query attention), got num_heads = {num_heads} "
                f"and num_kv_heads = {num_kv_heads}"
            )
        check_dropout(dropout, "dropout")
        if add_bias_kv:
            raise ValueError(
                "add_bias_kv=True is not supported: the extra key/value has no position, "
                "so it belongs to no segment of the dilated pattern"
            )
        if add_zero_attn:
            raise ValueError(
                "add_zero_attn=True is not supported: the extra zero key has no position, "
                "so it belongs to no segment of the dilated pattern"
            )
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        #: key/value heads; each is shared by num_heads // num_kv_heads consecutive query heads
        self.num_kv_heads = num_kv_heads
        # one (3·embed, embed) in_proj_weight, as nn.MultiheadAttention, where it fits
        self._qkv_same_embed_dim = (
            self.kdim == embed_dim and self.vdim == embed_dim and num_kv_heads == num_heads
        )
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        #: need_weights=True computes (batch, heads, L, S) weights densely: refused above this
        #: estimated memory (None: no limit)
        self.max_weights_bytes = max_weights_bytes
        # same parameters, names and initialisation as nn.MultiheadAttention
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.norm = nn.LayerNorm(embed_dim, **factory_kwargs) if layer_norm else None
        # the core module's own options (process_group, exchange, block_size, ...) pass through
        self.attention = self.attention_class(
            segment_lengths, dilation_rates, head_mode=head_mode, attention_dropout=dropout, backend=backend,
            **attention_kwargs,
        )  # fmt: skip
        self.attention.warn_layout = False  # the projections fix the layout; short sequences are no mistake
        # rotary/xPos on the projected queries and keys, at absolute positions
        self.position_embedding = make_position_embedding(
            position_embedding, self.head_dim, tuple(segment_lengths)
        )
        self._reset_parameters()
        self.register_forward_pre_hook(_keep_transformer_layers_off_fast_path)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e, kv_dim = self.embed_dim, self.num_kv_heads * self.head_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split([e, kv_dim, kv_dim])
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one matmul
                qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
                # one tensor's slices: the fused backward writes their gradients into one
                # buffer, which unbind's backward passes on without a stack copy
                q, k, v = unbind(qkv.unflatten(-1, (3, self.num_heads, self.head_dim)), 2)
                return q, k, v
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        kv_shape = (self.num_kv_heads, self.head_dim)
        return (
            F.linear(query, w_q, b_q).unflatten(-1, (self.num_heads, self.head_dim)),
            F.linear(key, w_k, b_k).unflatten(-1, kv_shape),
            F.linear(value, w_v, b_v).unflatten(-1, kv_shape),
        )

    def _per_query_head(self, x: Tensor) -> Tensor:
        """Key/value heads repeated per query head (the decoding cache and the dense weights)."""
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_cache: LayerKVCache | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Arguments and return value as ``nn.MultiheadAttention.forward``.

        ``query``/``key``/``value``: ``(seq, batch, embed)`` (``(batch, seq, embed)``
        with ``batch_first``) or unbatched ``(seq, embed)``; the key length ``S``
        may exceed the query length ``L``: the queries are then the last ``L``
        positions of the keys. Masks use the ``nn.MultiheadAttention`` conventions (bool
        True = not allowed; ``attn_mask`` ``(L, S)`` or ``(batch·heads, L, S)``).
        ``is_causal`` applies a causal mask, on top of ``attn_mask`` if both are
        given. ``need_weights=True`` computes the output and the exact dense
        weights of the dilated pattern with the O(seq²) reference.

        ``kv_cache`` (self-attention, causal, empty cache): also store the keys and
        values that later :meth:`decode_step` calls can still read (prefill).

        ``cu_seqlens``/``max_seqlen``: packed documents (see
        :func:`~dilated_attention_pytorch.functional.dilated_attention_varlen`):
        inputs of one packed row, ``(total_tokens, embed)`` or with a batch of 1,
        each document its own sequence; no masks, weights or cache.
        """
        refuse_torchscript()
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
            if x.is_nested:
                raise ValueError(
                    f"{name} is a nested tensor, which dilated attention does not take; build "
                    "nn.TransformerEncoder with enable_nested_tensor=False"
                )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        unbatched = query.dim() == 2
        # self-attention (one tensor) stays one tensor through the reshapes: one projection
        same = query is key and key is value
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask[None]
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if same:
            key = value = query
        batch, seq, _ = query.shape
        self._check_dtypes(query, key, value)
        for name, x, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features, got {x.shape[-1]}")
        seq_k = key.shape[1]
        if key.shape[0] != batch or value.shape[:2] != key.shape[:2] or seq_k < seq:
            raise ValueError(
                "key and value must have the query's batch size and one length S >= the query's L "
                f"(batch={batch}, L={seq}), got key {tuple(key.shape[:2])} and value "
                f"{tuple(value.shape[:2])} (batch, seq): dilated attention pairs queries and keys by "
                "position, the queries being the last L positions of the keys"
            )
        attn_mask = self._attn_mask_4d(attn_mask, batch, seq, seq_k, unbatched)
        if cu_seqlens is not None:
            self._check_packed(batch, seq, seq_k, key_padding_mask, attn_mask, need_weights, kv_cache)
        past = 0
        if kv_cache is not None:
            self._check_decoding(kv_cache, is_causal)
            past = kv_cache.length
            if past and (
                seq_k != seq or key_padding_mask is not None or attn_mask is not None or need_weights
            ):
                raise ValueError(
                    f"kv_cache already holds {past} positions: continuing from it (chunked prefill) takes "
                    "self-attention of the new positions only, without key_padding_mask, attn_mask or "
                    "need_weights"
                )
        q, k, v = self._project(query, key, value)
        if self.position_embedding is not None:
            q, k = self.position_embedding(q, k, offset=past if past else self._position_offset(seq))
        if kv_cache is not None:
            if past:  # the new queries sit at the end of the cached window's keys
                past_k, past_v = kv_cache.window()
                kv_cache.append(k, v)
                k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
            else:
                kv_cache.append(k, v)

        weights = None
        if need_weights:
            out, weights = self.attention.dense_weights(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                max_bytes=self.max_weights_bytes,
            )  # fmt: skip
            if self.training and self.dropout > 0.0:
                weights = F.dropout(weights, self.dropout)
                out = torch.einsum("bhqk,bkhd->bqhd", weights, self._per_query_head(v))
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights[0]
        elif cu_seqlens is not None:
            out = self.attention(q[0], k[0], v[0], is_causal=is_causal, cu_seqlens=cu_seqlens,
                                 max_seqlen=max_seqlen)[None]  # fmt: skip
        else:
            out = self.attention(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask
            )
        out = self._output(out)
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_packed(
        self, batch: int, seq: int, seq_k: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
        need_weights: bool, kv_cache: LayerKVCache | None,
    ) -> None:  # fmt: skip
        if batch != 1 or seq != seq_k:
            raise ValueError(
                "with cu_seqlens, query, key and value must be one packed row of the same total_tokens "
                f"((total_tokens, embed) or a batch of 1), got batch {batch}, lengths {seq} and {seq_k}"
            )
        if key_padding_mask is not None or attn_mask is not None or need_weights or kv_cache is not None:
            raise ValueError(
                "cu_seqlens (packed documents) takes no key_padding_mask, attn_mask, need_weights or kv_cache"
            )
        if isinstance(self.position_embedding, XPos):
            raise ValueError(
                "position_embedding='xpos' is not supported with cu_seqlens: its scales follow the packed "
                "positions, not each document's; rotary (relative) is exact"
            )

    def _check_dtypes(self, *inputs: Tensor) -> None:
        """Inputs in the parameters' dtype (autocast casts them itself)."""
        weight = self.out_proj.weight
        if torch.is_autocast_enabled(inputs[0].device.type):
            return
        for name, x in zip(("query", "key", "value"), inputs):
            if x.dtype != weight.dtype:
                raise ValueError(
                    f"{name} has dtype {x.dtype} but the module's parameters are {weight.dtype}: cast the "
                    f"inputs (x.to({weight.dtype})) or the module (module.to({x.dtype})), or run under "
                    "torch.autocast"
                )

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_torchscript(scripting=True)
        return self

    def _output(self, out: Tensor) -> Tensor:
        """Heads ``(batch, seq, heads, head_dim)`` -> ``(batch, seq, embed)``."""
        out = out.flatten(-2)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    def _position_offset(self, seq: int) -> int:
        """Absolute position of this call's first query (a shard's start when the
        attention shards the sequence over a process group)."""
        if getattr(self.attention, "sharded", False):
            group = getattr(self.attention, "process_group", None)
            shard = torch.distributed.get_rank(group)
            ring_group = getattr(self.attention, "ring_group", None)
            if ring_group is not None:  # the hybrid's shards are ring-major
                shard += torch.distributed.get_rank(ring_group) * torch.distributed.get_world_size(group)
            return shard * seq
        return 0

    def new_kv_cache(self) -> LayerKVCache:
        """An empty decoding cache for this module (see :meth:`decode_step`)."""
        return LayerKVCache(self.attention.pattern, self.num_heads, self.num_kv_heads)

    def _check_decoding(self, kv_cache: LayerKVCache, is_causal: bool) -> None:
        if type(self.attention) not in (DilatedAttention, ImprovedDilatedAttention):
            raise NotImplementedError(
                f"incremental decoding needs the plain dilated function; {type(self).__name__} "
                "computes another (block-sparse) or a sharded one (ring)"
            )
        if not is_causal:
            raise ValueError("kv_cache needs is_causal=True: decoding attends to past positions only")
        if (
            kv_cache.pattern != self.attention.pattern
            or kv_cache.num_heads != self.num_heads
            or kv_cache.num_kv_heads != self.num_kv_heads
        ):
            raise ValueError("kv_cache was made for another pattern or number of (key/value) heads")

    def decode_step(self, query: Tensor, kv_cache: LayerKVCache) -> Tensor:
        """Causal self-attention of one new position, ``query`` ``(batch, 1, embed)``
        (batch first, whatever ``batch_first`` says), at position ``kv_cache.length``.

        Appends the position's key and value to ``kv_cache`` and attends over what
        the cache holds; equal to the last row of a causal full forward over all
        positions so far. Returns ``(batch, 1, embed)``. Eval only: no dropout.
        """
        self._check_decoding(kv_cache, is_causal=True)
        if query.dim() != 3 or query.shape[1] != 1 or query.shape[2] != self.embed_dim:
            raise ValueError(f"query must have shape (batch, 1, {self.embed_dim}), got {tuple(query.shape)}")
        if self.training and self.dropout > 0.0:
            raise ValueError("decode_step runs without dropout: call model.eval() first")
        self._check_dtypes(query)
        q, k, v = self._project(query, query, query)
        if self.position_embedding is not None:
            q, k = self.position_embedding(q, k, offset=kv_cache.length)
        kv_cache.append(k, v)
        out = kv_cache.attend(q, self.attention.softmax_scale)
        return self._output(out)

    def _attn_mask_4d(
        self, attn_mask: Tensor | None, batch: int, seq: int, seq_k: int, unbatched: bool
    ) -> Tensor | None:
        """``(L, S)`` or ``(batch·heads, L, S)`` (nn.MultiheadAttention) -> 4-D."""
        if attn_mask is None or attn_mask.dim() == 2:
            return attn_mask
        h = self.num_heads
        if attn_mask.dim() == 4 and unbatched:
            return attn_mask
        if attn_mask.dim() != 3 or attn_mask.shape != (batch * h, seq, seq_k):
            raise ValueError(
                f"attn_mask must have shape (L, S) = ({seq}, {seq_k}) or (batch * num_heads, L, S) = "
                f"({batch * h}, {seq}, {seq_k}), got {tuple(attn_mask.shape)}"
            )
        return attn_mask.view(batch, h, seq, seq_k)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, batch_first={self.batch_first}"


class MultiheadDilatedAttention(_MultiheadDilatedAttentionBase):
    """``nn.MultiheadAttention`` with dilated attention (:class:`DilatedAttention`).

    Same constructor arguments, defaults, parameter names and forward as
    ``nn.MultiheadAttention``, plus ``segment_lengths``, ``dilation_rates``
    (default: LongNet's base setting), ``head_mode``, ``num_kv_heads``
    (grouped-query attention: ``k_proj_weight``/``v_proj_weight`` project to
    ``num_kv_heads`` heads, each read by ``num_heads // num_kv_heads`` consecutive
    query heads; default ``num_heads`` keeps ``nn.MultiheadAttention``'s
    parameters), ``layer_norm`` (MAGNETO
    sub-LayerNorm before ``out_proj``), ``backend`` and ``max_weights_bytes`` (the
    largest estimated memory ``need_weights=True`` may take for its dense weights,
    4 GiB by default; None: no limit). ``add_bias_kv`` and ``add_zero_attn`` raise:
    extra keys without a position have no dilated meaning.
    """

    attention_class = DilatedAttention


class ImprovedMultiheadDilatedAttention(_MultiheadDilatedAttentionBase):
    """:class:`MultiheadDilatedAttention` on :class:`ImprovedDilatedAttention`."""

    attention_class = ImprovedDilatedAttention


class RingMultiheadDilatedAttention(_MultiheadDilatedAttentionBase):
    """:class:`MultiheadDilatedAttention` over a sequence sharded across
    ``torch.distributed`` ranks (:class:`RingDilatedAttention`).

    Each rank passes its contiguous shard of query/key/value (and of
    ``key_padding_mask``) and gets its shard of the output. The projections are
    per position, so sharding them is exact; parameter gradients are per rank
    and are summed across ranks as in data parallelism (DDP/FSDP do this).
    ``need_weights=True`` and ``attn_mask`` are not supported (the weights of a
    sharded sequence live on several ranks). ``process_group`` and ``exchange``
    (keyword) go to :class:`RingDilatedAttention`.
    """

    attention_class = RingDilatedAttention


__all__ = [
    "ImprovedMultiheadDilatedAttention",
    "MultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
]
