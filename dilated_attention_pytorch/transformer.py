"""Transformer layers and LongNet models on dilated self-attention.

``DilatedTransformerEncoderLayer`` / ``DilatedTransformerDecoderLayer`` take the
arguments of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (and
are subclasses of them, so ``nn.TransformerEncoder``/``nn.TransformerDecoder``
stack them) with dilated self-attention. ``LongNet`` is the encoder–decoder
(``nn.Transformer``), ``LongNetLM`` the decoder-only causal language model with
exact incremental decoding. Defaults follow the LongNet paper's base setting:
d_model 768, 12 heads, segment_lengths [2048, 4096, 8192, 16384, 32768],
dilation_rates [1, 2, 4, 6, 12], MAGNETO (pre-LN plus sub-LayerNorm, scaled
initialisation), xPos positions in the language model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from .decoding import DilatedKVCache, LayerKVCache
from .factory import create_multihead_dilated_attention
from .multihead import _MultiheadDilatedAttentionBase
from .pattern import LONGNET_DILATION_RATES, LONGNET_SEGMENT_LENGTHS, HeadMode
from .positions import PositionKind

Activation = str | Callable[[Tensor], Tensor]


class _DilatedLayer(nn.Module):
    """Mixin before ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``:
    their constructor, then dilated self-attention in ``self_attn`` and MAGNETO's
    extra LayerNorm before ``linear2`` when ``sub_layernorm``."""

    linear1: nn.Linear
    linear2: nn.Linear
    dropout: nn.Dropout
    activation: Callable[[Tensor], Tensor]
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    norm_first: bool
    #: a dilated drop-in (a subclass of nn.MultiheadAttention, as the nn layers declare)
    self_attn: nn.MultiheadAttention
    #: the dropout after the feed-forward block (nn's encoder layer: dropout2, decoder layer: dropout3)
    _ff_output_dropout: str

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        head_mode: HeadMode = "grouped",
        attention_type: str = "auto",
        position_embedding: PositionKind | None = None,
        sub_layernorm: bool = False,
        **attention_kwargs: Any,
    ) -> None:
        if sub_layernorm and not norm_first:
            raise ValueError(
                "sub_layernorm=True needs norm_first=True: MAGNETO's sub-LayerNorm is a pre-LayerNorm layout"
            )
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(  # type: ignore[call-arg]
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            **factory_kwargs,
        )
        self.self_attn = create_multihead_dilated_attention(
            attention_type,
            embed_dim=d_model,
            num_heads=nhead,
            dropout=dropout,
            bias=bias,
            batch_first=batch_first,
            layer_norm=sub_layernorm,
            segment_lengths=segment_lengths,
            dilation_rates=dilation_rates,
            head_mode=head_mode,
            position_embedding=position_embedding,
            **factory_kwargs,
            **attention_kwargs,
        )
        self.ffn_norm = (
            nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            if sub_layernorm
            else None
        )
        # nn.TransformerEncoder's nested-tensor path and the fused encoder kernel read
        # self_attn's weights directly (dense attention); this keeps both off
        self.activation_relu_or_gelu = 0

    def _ff_block(self, x: Tensor) -> Tensor:
        x = self.dropout(self.activation(self.linear1(x)))
        if self.ffn_norm is not None:
            x = self.ffn_norm(x)
        return getattr(self, self._ff_output_dropout)(self.linear2(x))


class DilatedTransformerEncoderLayer(_DilatedLayer, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` with dilated self-attention.

    Positional arguments and defaults as ``nn.TransformerEncoderLayer``. Keyword
    only: ``segment_lengths``, ``dilation_rates``, ``head_mode`` (the pattern),
    ``attention_type`` (a factory type, default "auto"), ``position_embedding``
    (None, "rotary" or "xpos", applied to queries and keys), ``sub_layernorm``
    (MAGNETO: a LayerNorm before the attention's ``out_proj`` and before
    ``linear2``; needs ``norm_first=True``) and further attention arguments
    (``backend``, ...). ``forward`` as ``nn.TransformerEncoderLayer``: pass
    ``is_causal=True`` for a causal layer.
    """

    _ff_output_dropout = "dropout2"

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        kv_cache: LayerKVCache | None = None,
    ) -> Tensor:
        """As ``nn.TransformerEncoderLayer.forward``; ``kv_cache`` (causal, empty)
        is filled for later :meth:`decode_step` calls."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal, kv_cache)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal, kv_cache))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
        kv_cache: LayerKVCache | None = None,
    ) -> Tensor:
        x = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
            kv_cache=kv_cache,
        )[0]
        return self.dropout1(x)

    @property
    def _dilated_attn(self) -> _MultiheadDilatedAttentionBase:
        return cast(_MultiheadDilatedAttentionBase, self.self_attn)

    def decode_step(self, x: Tensor, kv_cache: LayerKVCache) -> Tensor:
        """One causal step: ``x`` ``(batch, 1, d_model)`` (batch first) at position
        ``kv_cache.length``; returns the layer output for it."""
        if self.norm_first:
            x = x + self._dilated_attn.decode_step(self.norm1(x), kv_cache)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._dilated_attn.decode_step(x, kv_cache))
        return self.norm2(x + self._ff_block(x))


class DilatedTransformerDecoderLayer(_DilatedLayer, nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` with dilated self-attention; the
    cross-attention over the encoder output (``multihead_attn``) stays dense
    ``nn.MultiheadAttention``, since target and source lengths differ.

    Keyword-only arguments as :class:`DilatedTransformerEncoderLayer`;
    ``sub_layernorm`` adds MAGNETO's LayerNorm to the self-attention and the
    feed-forward block (not to the dense cross-attention).
    """

    _ff_output_dropout = "dropout3"


def magneto_gain_(layers: Iterable[nn.Module], gain: float) -> None:
    """MAGNETO's initialisation: scale the value projection, ``out_proj`` and the
    feed-forward weights of each layer's dilated self-attention by ``gain``."""
    with torch.no_grad():
        for layer in layers:
            assert isinstance(layer, _DilatedLayer)
            attn = layer.self_attn
            if attn.in_proj_weight is not None:
                attn.in_proj_weight[2 * attn.embed_dim :].mul_(gain)
            else:
                attn.v_proj_weight.mul_(gain)
            for weight in (attn.out_proj.weight, layer.linear1.weight, layer.linear2.weight):
                weight.mul_(gain)


class LongNet(nn.Transformer):
    """Encoder–decoder LongNet: ``nn.Transformer`` (same arguments and
    ``forward``) built from :class:`DilatedTransformerEncoderLayer` and
    :class:`DilatedTransformerDecoderLayer`.

    Defaults are the paper's base setting (d_model 768, 12 heads, feed-forward
    3072, gelu, pre-LayerNorm with MAGNETO sub-LayerNorm and its initialisation,
    rotary positions in self-attention) rather than ``nn.Transformer``'s; pass
    ``norm_first=False, sub_layernorm=False, position_embedding=None`` for the
    original layout. The decoder's self-attention is causal when ``forward`` gets
    ``tgt_is_causal=True`` or a causal ``tgt_mask``. Inputs are embeddings, as in
    ``nn.Transformer``.
    """

    def __init__(
        self,
        d_model: int = 768,
        nhead: int = 12,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 3072,
        dropout: float = 0.1,
        activation: Activation = F.gelu,
        custom_encoder: Any | None = None,
        custom_decoder: Any | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        head_mode: HeadMode = "grouped",
        attention_type: str = "auto",
        position_embedding: PositionKind | None = "rotary",
        sub_layernorm: bool = True,
        **attention_kwargs: Any,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        layer_kwargs: dict[str, Any] = dict(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
            segment_lengths=segment_lengths,
            dilation_rates=dilation_rates,
            head_mode=head_mode,
            attention_type=attention_type,
            position_embedding=position_embedding,
            sub_layernorm=sub_layernorm,
            **factory_kwargs,
            **attention_kwargs,
        )
        if custom_encoder is None:
            custom_encoder = nn.TransformerEncoder(
                DilatedTransformerEncoderLayer(**layer_kwargs),
                num_encoder_layers,
                nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs),
                enable_nested_tensor=False,
            )
        if custom_decoder is None:
            custom_decoder = nn.TransformerDecoder(
                DilatedTransformerDecoderLayer(**layer_kwargs),
                num_decoder_layers,
                nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs),
            )
        super().__init__(
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            activation,
            custom_encoder,
            custom_decoder,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            **factory_kwargs,
        )
        if sub_layernorm:
            # MAGNETO's gains for an encoder of M and a decoder of N layers
            m, n = num_encoder_layers, num_decoder_layers
            magneto_gain_(self.encoder.layers, math.sqrt(math.log(3 * n) * math.log(2 * m) / 3))
            magneto_gain_(self.decoder.layers, math.sqrt(math.log(3 * n)))


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: token embedding, ``num_layers``
    causal :class:`DilatedTransformerEncoderLayer` blocks (pre-LN, MAGNETO
    sub-LayerNorm, xPos by default), a final LayerNorm and a tied output head.

    ``forward(input_ids)`` gives logits ``(batch, seq, vocab_size)``.
    :meth:`generate` decodes incrementally with a :class:`DilatedKVCache` that
    keeps only the keys and values dilated attention can still read; its logits
    equal those of a full forward pass.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 768,
        nhead: int = 12,
        num_layers: int = 12,
        dim_feedforward: int = 3072,
        dropout: float = 0.0,
        activation: Activation = F.gelu,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        *,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        head_mode: HeadMode = "grouped",
        attention_type: str = "auto",
        position_embedding: PositionKind | None = "xpos",
        sub_layernorm: bool = True,
        tie_weights: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("num_layers", num_layers)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_heads = nhead
        self.embed = nn.Embedding(vocab_size, d_model, **factory_kwargs)
        self.layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                activation,
                layer_norm_eps,
                batch_first=True,
                norm_first=True,
                bias=bias,
                segment_lengths=segment_lengths,
                dilation_rates=dilation_rates,
                head_mode=head_mode,
                attention_type=attention_type,
                position_embedding=position_embedding,
                sub_layernorm=sub_layernorm,
                **factory_kwargs,
                **attention_kwargs,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **factory_kwargs)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        if tie_weights:
            self.lm_head.weight = self.embed.weight
        if sub_layernorm:
            magneto_gain_(self.layers, math.sqrt(math.log(2 * num_layers)))

    def new_cache(self) -> DilatedKVCache:
        """An empty decoding cache for :meth:`forward` / :meth:`generate`."""
        first = cast(DilatedTransformerEncoderLayer, self.layers[0])
        attn = first._dilated_attn
        return DilatedKVCache(attn.attention.pattern, self.num_heads, len(self.layers), attn.num_kv_heads)

    def _check_ids(self, input_ids: Tensor) -> None:
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype
            not in (
                torch.int32,
                torch.int64,
            )
        ):
            raise ValueError("input_ids must be an int64/int32 tensor of shape (batch, seq)")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token")

    def forward(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        kv_cache: DilatedKVCache | None = None,
    ) -> Tensor:
        """Logits ``(batch, seq, vocab_size)`` for ``input_ids`` ``(batch, seq)``.

        ``key_padding_mask``: ``(batch, seq)``, True = padding (full forward only).
        ``kv_cache``: an empty cache is filled from a full forward (prefill); a
        non-empty one continues from position ``kv_cache.length`` (eval mode): one
        token through the constant-cost decoding step, several at once as a chunk
        (chunked prefill) whose queries attend to the cached keys and their own.
        Only the new tokens' logits are returned.
        """
        self._check_ids(input_ids)
        if kv_cache is not None and kv_cache.length:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is not supported when continuing from a kv_cache")
            if input_ids.shape[1] == 1:
                return self._step(input_ids[:, 0], kv_cache)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                src_key_padding_mask=key_padding_mask,
                is_causal=True,
                kv_cache=None if kv_cache is None else kv_cache[i],
            )
        return self.lm_head(self.norm(x))

    def _step(self, token: Tensor, kv_cache: DilatedKVCache) -> Tensor:
        x = self.embed(token[:, None])
        for i, layer in enumerate(self.layers):
            x = cast(DilatedTransformerEncoderLayer, layer).decode_step(x, kv_cache[i])
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``input_ids`` ``(batch, seq)`` by up to ``max_new_tokens`` tokens;
        returns ``(batch, seq + new)``. Greedy unless ``do_sample``; sampling uses
        ``temperature`` and ``top_k``. Stops early once every row has produced
        ``eos_token_id``. The prompt runs as one full forward (the fast path),
        then one cached step per token; call ``eval()`` first if dropout is set.
        """
        self._check_ids(input_ids)
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        cache = self.new_cache()
        logits = self(input_ids, kv_cache=cache)[:, -1]
        tokens = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if do_sample:
                scores = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, -math.inf)
                next_token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)
            else:
                next_token = logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done[:, None], eos_token_id)
                done |= next_token[:, 0] == eos_token_id
            tokens.append(next_token.to(input_ids.dtype))
            # done.all() syncs with the GPU: only ask when there is an eos to stop at
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self._step(next_token[:, 0], cache)[:, -1]
        return torch.cat(tokens, 1)


__all__ = [
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "LongNet",
    "LongNetLM",
    "magneto_gain_",
]
