"""Dilated attention as a Hugging Face ``transformers`` attention backend.

Importing this module registers the attention function ``"dilated"`` with
``transformers.AttentionInterface`` and a mask function of the same name with
``AttentionMaskInterface`` (which keeps transformers from building an
``(n × n)`` mask: it passes the 2-D padding mask, or nothing)::

    import dilated_attention_pytorch.integrations.transformers as dilated_hf

    model = AutoModelForCausalLM.from_config(config)
    dilated_hf.set_dilated_attention(model, segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4])

The pattern lives in ``config.dilated_attention`` (saved and loaded with the
config); after ``from_pretrained(path, attn_implementation="dilated")`` the
model runs it again.

Positions. The pattern's positions of a row count from its first key that the
padding mask keeps (a left-padded row starts at its first real token, as the
position ids of ``generate`` do), so a batch of left-padded prompts computes,
row by row, what each prompt computes alone. Packed documents (batch 1,
position ids restarting at 0, or the ``cu_seq_lens_q``/``cu_seq_lens_k``
arguments of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)
each start their own pattern.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "dilated_attention_pytorch.integrations.transformers needs transformers: "
        "pip install 'torch-dilated-attention[hf]'"
    ) from error

from .._cache import TensorMemo
from ..core.varlen import cu_seqlens_from_document_ids
from ..decoding import LayerKVCache
from ..functional import _dilated_attention, dilated_attention_varlen
from ..pattern import DilatedPattern, HeadMode

__all__ = [
    "NAME",
    "SUPPORTED_MODEL_TYPES",
    "DilatedCache",
    "DilatedCacheLayer",
    "cache_kwargs",
    "dilated_attention_forward",
    "layer_pattern",
    "output_cache",
    "padding_mask",
    "set_dilated_attention",
]

#: the name registered with ``AttentionInterface`` and ``AttentionMaskInterface``
NAME = "dilated"
#: model families whose attention the tests run through this backend
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: the config attribute holding the pattern
CONFIG_KEY = "dilated_attention"

_PATTERN_KEYS = ("segment_lengths", "dilation_rates", "head_mode")


def set_dilated_attention(
    model: PreTrainedModel | PretrainedConfig,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_mode: HeadMode = "grouped",
    layers: Mapping[int, Mapping[str, Any]] | None = None,
    detect_packed_sequences: bool = True,
) -> None:
    """Set the dilated pattern of a model (or of a config before building one).

    Args:
        model: a ``PreTrainedModel`` (its attention is switched to ``"dilated"``)
            or a ``PretrainedConfig`` (build the model with
            ``attn_implementation="dilated"``).
        segment_lengths: every layer's segment lengths.
        dilation_rates: one per segment length.
        head_mode: ``"grouped"`` or ``"all"`` (docs/semantics.md).
        layers: per-layer overrides, ``{layer_idx: {"segment_lengths": ...,
            "dilation_rates": ..., "head_mode": ...}}`` (missing keys: the
            model's).
        detect_packed_sequences: find packed documents in a batch-1 row of
            position ids that restart (one host read per forward; under
            ``torch.compile`` a graph break per layer). False: a row is one
            sequence unless ``cu_seq_lens_q``/``cu_seq_lens_k`` are passed
            (compile-clean).

    Raises ``ValueError`` for a model family that is not supported, a config
    with a sliding window or cross-attention, or an invalid pattern.
    """
    config = model.config if isinstance(model, PreTrainedModel) else model
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"model must be a transformers PreTrainedModel or PretrainedConfig, got {type(model).__name__}"
        )
    settings: dict[str, Any] = {
        "segment_lengths": list(segment_lengths),
        "dilation_rates": list(dilation_rates),
        "head_mode": head_mode,
        "detect_packed_sequences": bool(detect_packed_sequences),
    }
    if layers:
        overrides = {}
        for index, override in layers.items():
            unknown = set(override) - set(_PATTERN_KEYS)
            if unknown:
                raise ValueError(
                    f"layers[{index}] has unknown keys {sorted(unknown)}; allowed: {_PATTERN_KEYS}"
                )
            overrides[str(int(index))] = {k: list(v) if k != "head_mode" else v for k, v in override.items()}
        settings["layers"] = overrides
    _check_config(config)
    setattr(config, CONFIG_KEY, settings)
    _patterns(config)  # every layer's pattern is valid
    if isinstance(model, PreTrainedModel):
        model.set_attn_implementation(NAME)


def layer_pattern(config: PretrainedConfig, layer_idx: int | None) -> DilatedPattern:
    """The pattern of layer ``layer_idx`` in ``config.dilated_attention``."""
    patterns = _patterns(config)
    if layer_idx is None:
        return patterns[None]
    return patterns.get(int(layer_idx), patterns[None])


def _patterns(config: PretrainedConfig) -> dict[int | None, DilatedPattern]:
    """``{None: the model's pattern, layer: its override}``, built once per config."""
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"config.{CONFIG_KEY} is not set: call set_dilated_attention(model, segment_lengths, "
            "dilation_rates) before running a model with attn_implementation='dilated'"
        )
    key = _frozen(settings)
    found = _PATTERNS.get(key)
    if found is None:
        if len(_PATTERNS) >= 16:
            _PATTERNS.clear()
        found = _PATTERNS[key] = _build_patterns(settings)
    return found


def _frozen(x: Any) -> Any:
    """``x`` as a hashable key (built in plain Python that torch.compile traces)."""
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    return x


def _build_patterns(settings: Mapping[str, Any]) -> dict[int | None, DilatedPattern]:
    base = {k: settings[k] for k in _PATTERN_KEYS if k in settings}
    patterns: dict[int | None, DilatedPattern] = {None: _pattern(base, CONFIG_KEY)}
    for index, override in dict(settings.get("layers") or {}).items():
        patterns[int(index)] = _pattern({**base, **override}, f"{CONFIG_KEY}['layers'][{index}]")
    return patterns


#: a plain dict, not a BoundedCache: torch.compile traces this lookup in every layer
_PATTERNS: dict[Any, dict[int | None, DilatedPattern]] = {}


def _pattern(settings: Mapping[str, Any], where: str) -> DilatedPattern:
    missing = [k for k in ("segment_lengths", "dilation_rates") if k not in settings]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    return DilatedPattern(
        settings["segment_lengths"], settings["dilation_rates"], settings.get("head_mode", "grouped")
    )


def _check_config(config: PretrainedConfig) -> None:
    """The model-level options that conflict with the pattern."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the dilated attention backend "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models (cross-attention) are not supported by the dilated backend")
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise ValueError(
            f"config.sliding_window = {window}: a sliding window conflicts with the dilated pattern; "
            "set config.sliding_window = None (and use_sliding_window = False)"
        )
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"config.layer_types holds {sorted(kinds - {'full_attention'})}: the dilated backend "
            "replaces full attention only"
        )


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The mask transformers passes to :func:`dilated_attention_forward`: the
    bool ``(batch, kv_length)`` padding mask (True = keep), or None when every
    key is kept. No ``(q_length × kv_length)`` mask is built."""
    if isinstance(q_offset, int) and q_offset + q_length != kv_offset + kv_length:
        raise ValueError(
            "the dilated backend needs the queries to be the last positions of the keys "
            f"(q_offset + q_length == kv_offset + kv_length), got q_offset = {q_offset}, "
            f"q_length = {q_length}, kv_length = {kv_length}, kv_offset = {kv_offset}: static or "
            "sliding caches are not supported, use the default DynamicCache or DilatedCache"
        )
    if attention_mask is None:
        return None
    if kv_offset and not bool(attention_mask.all()):  # only DilatedCache drops keys in front
        raise ValueError(
            "DilatedCache needs rows without padding (its window starts at the same position in "
            "every row); generate padded prompts with the default DynamicCache"
        )
    keep = attention_mask[:, -kv_length:].bool()
    if keep.shape[1] == kv_length and bool(keep.all()):
        return None
    return keep


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Where each row of a padding mask starts (-1: no key kept) and whether it
    keeps every key from there on."""

    starts: list[int]
    dense: list[bool]


_ROWS: TensorMemo[_Rows] = TensorMemo(8)
_DOCUMENTS: TensorMemo[tuple[Tensor, int] | None] = TensorMemo(8)


def _rows_of(keep: Tensor) -> _Rows:
    def read() -> _Rows:
        kept = keep.any(1)
        first = torch.where(kept, keep.int().argmax(1), -1)
        tail = torch.arange(keep.shape[1], device=keep.device)[None] >= first[:, None]
        dense = (keep | ~tail).all(1)
        return _Rows([int(x) for x in first.tolist()], [bool(x) for x in dense.tolist()])

    return _ROWS.get(keep, read)


def _documents_of(position_ids: Tensor) -> tuple[Tensor, int] | None:
    """``(cu_seqlens, max_seqlen)`` of packed documents in a ``(1, n)`` row of
    position ids (a new document wherever a position is not the previous plus
    one, transformers' rule), or None for one sequence."""

    def read() -> tuple[Tensor, int] | None:
        row = position_ids[0]
        starts = torch.ones_like(row, dtype=torch.bool)
        starts[1:] = row[1:] != row[:-1] + 1
        if not bool(starts[1:].any()):
            return None
        return cu_seqlens_from_document_ids(starts.cumsum(0))

    return _DOCUMENTS.get(position_ids, read)


def _refuse_options(module: nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported by the dilated backend (it never forms the "
            "attention weights); use attn_implementation='eager' to inspect them at short lengths"
        )
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"sliding_window = {kwargs['sliding_window']}: a sliding window conflicts with the dilated "
            "pattern; set config.sliding_window = None"
        )
    if kwargs.get("softcap"):
        raise ValueError("attention logit soft-capping (softcap) is not supported by the dilated backend")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the dilated backend")
    if kwargs.get("cache") is not None:
        raise ValueError("paged caches (continuous batching) are not supported by the dilated backend")
    _check_config(_config(module))


def _config(module: nn.Module) -> PretrainedConfig:
    return cast(PretrainedConfig, module.config)


def dilated_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``"dilated"`` attention function of ``AttentionInterface``.

    Args:
        module: the model's attention layer (``config``, ``layer_idx``, ``is_causal``).
        query: ``(batch, heads, seq_q, head_dim)``.
        key: ``(batch, kv_heads, seq_k, head_dim)``, ``heads % kv_heads == 0``
            (shared, never repeated); ``seq_q <= seq_k``, the queries being the
            last positions (a cache).
        value: ``(batch, kv_heads, seq_k, head_dim)``.
        attention_mask: bool ``(batch, seq_k)`` padding mask (True = keep) from
            :func:`padding_mask`, or None.
        dropout: dropout on the attention probabilities.
        scaling: the softmax scale.
        is_causal: defaults to ``module.is_causal``.
        **kwargs: transformers' arguments: ``position_ids`` ``(batch, seq_q)``,
            ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q`` of packed documents.

    Returns:
        ``((batch, seq_q, heads, head_dim), None)``: no attention weights.
    """
    _refuse_options(module, kwargs)
    config = _config(module)
    pattern = layer_pattern(config, getattr(module, "layer_idx", None))
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor)
        or attention_mask.dim() != 2
        or attention_mask.dtype != torch.bool
    ):
        shape = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            "the dilated backend takes the 2-D padding mask (batch, seq_k) that transformers makes "
            f"for it, got {shape}: custom 4-D masks are not supported"
        )
    if not query.dtype == key.dtype == value.dtype:  # autocast: the projections' dtype
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        query, key, value = (x.to(dtype) for x in (query, key, value))
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (batch, seq, heads, head_dim)
    b, seq_q = q.shape[:2]
    seq_k = k.shape[1]
    if not causal and seq_q != seq_k:
        raise ValueError(
            "the dilated backend runs self-attention: a non-causal call with seq_q != seq_k "
            f"({seq_q} != {seq_k}) is cross-attention, which it does not support"
        )
    kw = _Options(float(dropout), scaling)
    detect = getattr(config, CONFIG_KEY).get("detect_packed_sequences", True)
    documents = _packing(kwargs, attention_mask, b, seq_q, seq_k, detect)
    if documents is not None:
        cu_seqlens, max_seqlen = documents
        out = dilated_attention_varlen(
            q[0], k[0], v[0], cu_seqlens, max_seqlen, pattern, is_causal=causal, dropout_p=kw.dropout_p,
            softmax_scale=kw.softmax_scale,
        )  # fmt: skip
        return out[None], None
    if attention_mask is None:
        return _call(q, k, v, None, pattern, causal, kw), None
    if attention_mask.shape != (b, seq_k):
        raise ValueError(
            f"attention_mask must have shape (batch, seq_k) = {(b, seq_k)}, got {tuple(attention_mask.shape)}"
        )
    return _padded(q, k, v, attention_mask, pattern, causal, kw), None


@dataclasses.dataclass(frozen=True)
class _Options:
    dropout_p: float
    softmax_scale: float | None


def _call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ignore: Tensor | None,
    pattern: DilatedPattern,
    causal: bool,
    kw: _Options,
) -> Tensor:
    return _dilated_attention(
        q, k, v, pattern, causal, ignore, None, kw.dropout_p, kw.softmax_scale, "fused", None,
        warn_layout=False,
    )  # fmt: skip


def _packing(
    kwargs: dict[str, Any], attention_mask: Tensor | None, batch: int, seq_q: int, seq_k: int, detect: bool
) -> tuple[Tensor, int | None] | None:
    """Packed documents of a call: the flash-attention kwargs, or position ids that restart."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if batch != 1 or seq_q != seq_k or attention_mask is not None:
            raise ValueError(
                "cu_seq_lens_q/cu_seq_lens_k need packed documents in one row (batch 1), no padding "
                f"mask and no cache, got batch = {batch}, seq_q = {seq_q}, seq_k = {seq_k}"
            )
        if cu_q is None or cu_k is None or (cu_q is not cu_k and not torch.equal(cu_q, cu_k)):
            raise ValueError("the dilated backend needs cu_seq_lens_q == cu_seq_lens_k (self-attention)")
        max_length = kwargs.get("max_length_q")
        return cu_q, None if max_length is None else int(max_length)
    position_ids = kwargs.get("position_ids")
    if not detect or position_ids is None or batch != 1 or seq_q != seq_k or attention_mask is not None:
        return None
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq_q:
        return None
    return _documents_of(position_ids)


def _padded(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, pattern: DilatedPattern, causal: bool, kw: _Options
) -> Tensor:
    """Rows grouped by where they start; each group's keys from its start on
    (its positions count from there), queries before the start give zeros.
    Rows that start at different places and keep every key after their start
    (left padding, a prefill) run as packed documents, one varlen call."""
    rows = _rows_of(keep)
    b, seq_q, h, _ = q.shape
    seq_k = k.shape[1]
    groups: dict[int, list[int]] = {}
    for row, start in enumerate(rows.starts):
        if start >= 0:
            groups.setdefault(start, []).append(row)
    if seq_q == seq_k and len(groups) > 1 and all(rows.dense[r] for m in groups.values() for r in m):
        return _as_documents(q, k, v, rows.starts, pattern, causal, kw)
    out = q.new_zeros(b, seq_q, h, v.shape[-1])
    for start, members in groups.items():
        first_query = max(0, start - (seq_k - seq_q))
        if first_query >= seq_q:
            continue
        index = None if len(members) == b else torch.tensor(members, device=q.device)
        dense = all(rows.dense[row] for row in members)
        ignore = None if dense else ~_take(keep, index, start)
        result = _call(
            _take(q, index, first_query), _take(k, index, start), _take(v, index, start), ignore,
            pattern, causal, kw,
        )  # fmt: skip
        if index is None:
            out[:, first_query:] = result
        else:
            out[index, first_query:] = result
    return out


def _as_documents(
    q: Tensor, k: Tensor, v: Tensor, starts: list[int], pattern: DilatedPattern, causal: bool, kw: _Options
) -> Tensor:
    """Each row's tokens from its start on as one document of a packed call."""
    b, n, h, _ = q.shape
    spans = [(row, start) for row, start in enumerate(starts) if start >= 0]
    index = torch.cat([torch.arange(row * n + start, (row + 1) * n) for row, start in spans]).to(q.device)
    bounds = [0, *itertools.accumulate(n - start for _, start in spans)]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    q_docs, k_docs, v_docs = (x.flatten(0, 1).index_select(0, index) for x in (q, k, v))
    out = dilated_attention_varlen(
        q_docs, k_docs, v_docs, cu_seqlens, max(n - start for _, start in spans), pattern, is_causal=causal,
        dropout_p=kw.dropout_p, softmax_scale=kw.softmax_scale,
    )  # fmt: skip
    return out.new_zeros(b * n, h, v.shape[-1]).index_copy(0, index, out).view(b, n, h, v.shape[-1])


def _take(x: Tensor, rows: Tensor | None, first: int) -> Tensor:
    """Rows ``rows`` (None: all) of ``x`` from position ``first`` on."""
    return (x if rows is None else x.index_select(0, rows))[:, first:]


class DilatedCacheLayer(CacheLayerMixin):
    """One layer of :class:`DilatedCache`: a :class:`~...decoding.LayerKVCache`
    (``Σ ceil(w_i / r_i)`` slots per branch and key/value head, whatever the
    context), handing the attention function the keys of the window that
    every new query's segments lie in (from the last multiple of
    ``lcm(segment_lengths)`` on), so any attention function gets exactly the
    keys the pattern reads."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, pattern: DilatedPattern, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.cache = LayerKVCache(pattern, num_heads, num_kv_heads)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(batch, kv_heads, m, head_dim)`` new keys and values; returns those of
        the window, the new ones last."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # (batch, m, kv_heads, head_dim)
        if self.cache.length:
            # one new query reads one residue per branch
            window_k, window_v = self.cache.window(next_query_only=k.shape[1] == 1)
            keys, values = torch.cat([window_k, k], 1), torch.cat([window_v, v], 1)
        else:
            keys, values = k, v
        self.cache.append(k, v)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        start = self.cache.window_start()
        return self.cache.length - start + query_length, start

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache = LayerKVCache(self.cache.pattern, self.cache.num_heads, self.cache.num_kv_heads)
        self.is_initialized = False

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "DilatedCache keeps only what the pattern reads: beam search, cropping (assisted decoding) "
            "and repeating rows are not supported; use the default DynamicCache"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported
    offload = prefetch = _unsupported


#: the keyword ``generate`` and a model's forward take a cache by, and the field of the
#: outputs that holds it: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old
#: name warns, and goes in 5.40 for forward, 6.0 for generate); earlier 5.x know only the old
_CACHE_NAME = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``cache`` by the keyword ``generate`` and a model's forward take it in the
    installed transformers (``cache=`` from 5.24, ``past_key_values=`` before)::

        model.generate(ids, **cache_kwargs(DilatedCache(model.config)))
    """
    return {_CACHE_NAME: cache}


def output_cache(output: Any) -> Cache | None:
    """The cache a model's forward or ``generate`` returned (``output.cache`` from
    transformers 5.24, ``output.past_key_values`` before)."""
    return getattr(output, _CACHE_NAME)


class DilatedCache(Cache):
    """A constant-size key/value cache for a model with the dilated backend:
    ``model.generate(ids, **cache_kwargs(DilatedCache(model.config)))``, that is
    ``cache=DilatedCache(...)`` from transformers 5.24, ``past_key_values=`` before.

    Per layer it holds ``Σ_i ceil(w_i / r_i)`` positions per branch and key/value
    head (:class:`~...decoding.LayerKVCache`), so memory stays the same however
    long the context grows. Rows must not be padded (every row's window starts
    at the same position); generate padded batches with the default cache.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers: list[Any] = [
            DilatedCacheLayer(layer_pattern(config, i), heads, kv_heads)
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of every layer's buffers (constant once the first tokens are written)."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, DilatedCacheLayer))


AttentionInterface.register(NAME, dilated_attention_forward)
AttentionMaskInterface.register(NAME, padding_mask)
