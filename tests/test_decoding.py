"""Incremental decoding: step-by-step logits equal a full forward pass, the
cache holds only what dilated attention can still read and never grows, and
generate() equals greedy decoding by repeated full forwards."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dilated_attention_pytorch import (
    BlockSparseRingMultiheadDilatedAttention,
    DilatedKVCache,
    DilatedPattern,
    ImprovedMultiheadDilatedAttention,
    LayerKVCache,
    LongNetLM,
    MultiheadDilatedAttention,
)
from dilated_attention_pytorch.reference import dilated_attention_reference

from .conftest import PATTERNS, assert_close


def _lm(segment_lengths, dilation_rates, heads: int, head_mode: str, position, **kw) -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(
        40,
        d_model=8 * heads,
        nhead=heads,
        num_layers=2,
        dim_feedforward=32,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        head_mode=head_mode,
        position_embedding=position,
        dtype=torch.float64,
        **kw,
    ).eval()


@pytest.mark.parametrize("position", [None, "rotary", "xpos"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize(("segment_lengths", "dilation_rates", "seq_len", "heads"), PATTERNS)
def test_stepwise_logits_equal_full_forward(
    segment_lengths, dilation_rates, seq_len, heads, head_mode, position
):
    nested = all(max(segment_lengths) % w == 0 for w in segment_lengths)
    if position == "xpos" and not nested:
        pytest.skip("xpos needs nested segment lengths (checked in test_positions)")
    model = _lm(segment_lengths, dilation_rates, heads, head_mode, position)
    n = seq_len + 13  # run past the last segment boundary too
    ids = torch.randint(0, 40, (2, n), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    for prompt in (1, 5):
        cache = model.new_cache()
        prefill = model(ids[:, :prompt], kv_cache=cache)
        steps = model(ids[:, prompt:], kv_cache=cache)
        assert cache.length == n
        assert_close(torch.cat([prefill, steps], 1), full, torch.float64, f"prompt {prompt}")


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_multihead_decode_step_equals_last_row(head_mode: str) -> None:
    torch.manual_seed(0)
    e, h, n = 24, 3, 23
    for cls in (MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention):
        mha = cls(
            e, h, segment_lengths=(4, 12), dilation_rates=(1, 3), head_mode=head_mode, dtype=torch.float64
        )
        x = torch.randn(2, n, e, dtype=torch.float64)
        full, _ = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True)
        cache = mha.new_kv_cache()
        rows = [mha.decode_step(x[:, p : p + 1], cache) for p in range(n)]
        assert_close(torch.cat(rows, 1), full.transpose(0, 1), torch.float64, cls.__name__)


def test_cache_holds_only_readable_slots_and_never_grows() -> None:
    seg, dil, heads, head_dim = (4, 8, 16), (1, 2, 4), 4, 8
    for head_mode in ("grouped", "all"):
        model = _lm(seg, dil, heads, head_mode, "rotary")
        cache = model.new_cache()
        ids = torch.randint(0, 40, (1, 3))
        model(ids, kv_cache=cache)
        size = cache.nbytes()
        pattern = DilatedPattern(seg, dil, head_mode)
        per_branch_heads = (
            [heads] * len(seg) if head_mode == "all" else [len(g) for g in pattern.head_groups(heads)]
        )
        slots = sum(math.ceil(w / r) * hb for w, r, hb in zip(seg, dil, per_branch_heads))
        assert size == 2 * len(model.layers) * slots * head_dim * 8  # keys + values, float64
        model(torch.randint(0, 40, (1, 100)), kv_cache=cache)
        assert cache.nbytes() == size
        assert cache.length == 103


def test_generate_equals_greedy_full_forwards() -> None:
    model = _lm((4, 8), (1, 2), 2, "all", "xpos")
    prompt = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, 12)
    assert out.shape == (3, 18)
    assert torch.equal(out[:, :6], prompt)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_generate_sampling_is_reproducible_and_respects_top_k_and_eos() -> None:
    model = _lm((4, 8), (1, 2), 2, "grouped", None)
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(3))
    a = model.generate(prompt, 8, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 8, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy decoding
    greedy = model.generate(prompt, 8)
    assert torch.equal(model.generate(prompt, 8, do_sample=True, top_k=1), greedy)
    # stopping on the first greedy token of row 0: row 0 pads with eos, generation stops at once if all done
    eos = int(greedy[0, 4])
    stopped = model.generate(prompt, 8, eos_token_id=eos)
    assert stopped[0, 4] == eos and (stopped[0, 4:] == eos).all()


def test_decoding_errors() -> None:
    model = _lm((4, 8), (1, 2), 2, "grouped", None)
    cache = model.new_cache()
    model(torch.randint(0, 40, (1, 3)), kv_cache=cache)
    attn = model.layers[0].self_attn
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    for bad in (
        {"key_padding_mask": torch.zeros(1, 2, dtype=torch.bool)},
        {"attn_mask": torch.zeros(2, 2, dtype=torch.bool)},
        {"need_weights": True},
    ):
        with pytest.raises(ValueError, match="already holds 3 positions: continuing from it"):
            attn(x, x, x, is_causal=True, kv_cache=cache[0], **bad)
    with pytest.raises(ValueError, match="already holds 3 positions: continuing from it"):
        longer = torch.randn(1, 3, 16, dtype=torch.float64)
        attn(x, longer, longer, is_causal=True, kv_cache=cache[0])  # keys beyond the new positions
    assert cache[0].length == 3  # refused calls leave the cache as it was
    with pytest.raises(ValueError, match="is_causal=True"):
        x = torch.randn(1, 2, 16, dtype=torch.float64)
        attn(x, x, x, kv_cache=attn.new_kv_cache())
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 16\)"):
        attn.decode_step(torch.randn(1, 2, 16, dtype=torch.float64), cache[0])
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(
            torch.randint(0, 40, (1, 2)), key_padding_mask=torch.zeros(1, 2, dtype=torch.bool), kv_cache=cache
        )
    with pytest.raises(ValueError, match="another pattern"):
        other = ImprovedMultiheadDilatedAttention(
            16, 2, segment_lengths=(8,), dilation_rates=(1,), dtype=torch.float64
        )
        other.decode_step(torch.randn(1, 1, 16, dtype=torch.float64), cache[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.randint(0, 40, (1, 2)), -1)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(1, 2))
    dropout = MultiheadDilatedAttention(16, 2, dropout=0.1, segment_lengths=(4,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="eval"):
        dropout.decode_step(torch.randn(1, 1, 16), dropout.new_kv_cache())
    sparse = BlockSparseRingMultiheadDilatedAttention(
        16, 2, segment_lengths=(4,), dilation_rates=(1,), block_size=2
    )
    with pytest.raises(NotImplementedError, match="block-sparse"):
        sparse.decode_step(torch.randn(1, 1, 16), sparse.new_kv_cache())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_stepwise_logits_equal_full_forward_on_gpu(dtype: torch.dtype, head_mode: str) -> None:
    torch.manual_seed(0)
    position = "rotary" if dtype == torch.float16 else "xpos"
    model = LongNetLM(40, d_model=64, nhead=4, num_layers=2, dim_feedforward=128,
                      segment_lengths=(16, 32, 64), dilation_rates=(1, 2, 4), head_mode=head_mode,
                      position_embedding=position, device="cuda", dtype=dtype).eval()  # fmt: skip
    ids = torch.randint(0, 40, (2, 150), device="cuda")
    with torch.no_grad():
        full = model(ids).float()
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, :70], kv_cache=cache), model(ids[:, 70:], kv_cache=cache)], 1).float()
    # float64 on CPU is the truth; each GPU path is within the dtype's tolerance of it
    truth = _to_cpu64(model)(ids.cpu())
    assert_close(full.cpu(), truth, dtype, "full forward")
    assert_close(steps.cpu(), truth, dtype, "stepwise")


def _to_cpu64(model: LongNetLM) -> LongNetLM:
    import copy

    return copy.deepcopy(model).to("cpu", torch.float64)


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_grouped_query_heads_decode_like_the_full_forward(head_mode: str) -> None:
    model = _lm((4, 8), (1, 2), 4, head_mode, "rotary", num_kv_heads=2)
    assert model.layers[0].self_attn.num_kv_heads == 2
    ids = torch.randint(0, 40, (2, 21), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, :3], kv_cache=cache), model(ids[:, 3:], kv_cache=cache)], 1)
    assert_close(steps, full, torch.float64, "stepwise")


@pytest.mark.parametrize("position", [None, "rotary", "xpos"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize(("segment_lengths", "dilation_rates", "seq_len", "heads"), PATTERNS)
def test_chunked_prefill_equals_full_forward(
    segment_lengths, dilation_rates, seq_len, heads, head_mode, position
):
    """Chunks of several tokens continue a non-empty cache, across segment boundaries and
    between single decoding steps: the logits are the full forward's."""
    nested = all(max(segment_lengths) % w == 0 for w in segment_lengths)
    if position == "xpos" and not nested:
        pytest.skip("xpos needs nested segment lengths (checked in test_positions)")
    model = _lm(segment_lengths, dilation_rates, heads, head_mode, position)
    n = 2 * seq_len + 5
    ids = torch.randint(0, 40, (2, n), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache()
    bounds = [0, 3, 10, 11, seq_len, seq_len + 1, n]  # chunks of 3, 7, 1, ..., 1, the rest
    pieces = [model(ids[:, a:b], kv_cache=cache) for a, b in itertools.pairwise(bounds) if b > a]
    assert cache.length == n
    assert_close(torch.cat(pieces, 1), full, torch.float64, "chunked")


@pytest.mark.parametrize("cls", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_multihead_chunk_after_cache_equals_last_rows(cls, head_mode: str) -> None:
    torch.manual_seed(0)
    e, h, kv, n = 24, 6, 2, 29
    mha = cls(
        e, h, segment_lengths=(4, 6, 12), dilation_rates=(1, 2, 3), head_mode=head_mode,
        num_kv_heads=kv, batch_first=True, dtype=torch.float64,
    )  # fmt: skip
    x = torch.randn(2, n, e, dtype=torch.float64)
    full, _ = mha(x, x, x, is_causal=True)
    for split in (5, 12, 13, 24):  # within a segment, on a boundary of all, just after one
        cache = mha.new_kv_cache()
        head, _ = mha(x[:, :split], x[:, :split], x[:, :split], is_causal=True, kv_cache=cache)
        tail = x[:, split:]
        rest, _ = mha(tail, tail, tail, is_causal=True, kv_cache=cache)
        assert cache.length == n
        assert_close(torch.cat([head, rest], 1), full, torch.float64, f"split {split}")


def test_window_holds_only_what_later_queries_read() -> None:
    """Every key a query at length or later can read is in the window, with its true value
    (keys the cache still holds but no later query reads may be there too)."""
    pattern = DilatedPattern((4, 6, 12), (1, 2, 3), "all")
    heads, n = 6, 17
    cache = DilatedKVCache(pattern, heads, 1)[0]
    keys = torch.randn(1, n, heads, 2, dtype=torch.float64)
    cache.append(keys, keys)
    start = cache.window_start()
    assert start == 12  # lcm(4, 6, 12)
    window, _ = cache.window()
    assert window.shape == (1, n - start, heads, 2)
    from dilated_attention_pytorch.reference import branch_mask

    readable = torch.zeros(n - start, heads, dtype=torch.bool)
    for i in range(pattern.num_branches):
        mask = branch_mask(pattern, i, n + 12, heads)  # (heads, queries, keys)
        readable |= mask[:, n:, start:n].any(1).T
    filled = window[0].abs().sum(-1) > 0
    assert filled[readable].all() and readable.any()
    assert torch.equal(window[0][filled], keys[0, start:][filled])  # never a stale key


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_next_query_window_holds_what_the_next_query_reads(head_mode: str) -> None:
    """``next_query_only``: at every length, the keys the query at ``length`` reads
    are there with their true values, every other position is zero."""
    from dilated_attention_pytorch.reference import branch_mask

    pattern = DilatedPattern((4, 6, 12), (1, 2, 3), head_mode)
    heads, total = 6, 40
    keys = torch.randn(1, total, 2, 3, dtype=torch.float64)
    cache = LayerKVCache(pattern, heads, 2)
    for n in range(1, total):
        cache.append(keys[:, n - 1 : n], keys[:, n - 1 : n])
        start = cache.window_start()
        window, _ = cache.window(next_query_only=True)
        read = torch.zeros(n - start, 2, dtype=torch.bool)
        for i in range(pattern.num_branches):
            mask = branch_mask(pattern, i, n + 1, heads)[:, n, start:n]  # (heads, keys) of query n
            for head in range(heads):
                read[:, head // 3] |= mask[head]
        filled = window[0].abs().sum(-1) > 0
        assert torch.equal(filled, read), n
        assert torch.equal(window[0][filled], keys[0, start:n][filled])


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_cache_holds_key_value_heads_not_query_heads(head_mode: str, kv_heads: int) -> None:
    """One decoding step at a time equals the reference's last rows, and the cache
    keeps one slot row per key/value head and residue its query heads read."""
    pattern = DilatedPattern((4, 6, 12), (1, 2, 3), head_mode)
    heads, n, d = 6, 29, 4
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, heads, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, n, kv_heads, d, generator=g, dtype=torch.float64) for _ in "kv")
    cache = LayerKVCache(pattern, heads, kv_heads)
    steps = []
    for p in range(n):
        cache.append(k[:, p : p + 1], v[:, p : p + 1])
        steps.append(cache.attend(q[:, p : p + 1]))
    expected = dilated_attention_reference(q, k, v, pattern.segment_lengths, pattern.dilation_rates,
                                           head_mode=head_mode, is_causal=True)  # fmt: skip
    assert_close(torch.cat(steps, 1), expected, torch.float64, "stepwise")
    group = heads // kv_heads
    pairs = [
        {(j // group, o) for j, o in enumerate(pattern.branch_offsets(i, heads)) if o is not None}
        for i in range(pattern.num_branches)
    ]
    slots = [-(-w // r) for w, r in zip(pattern.segment_lengths, pattern.dilation_rates)]
    assert cache.nbytes() == sum(2 * 2 * s * len(p) * d * 8 for s, p in zip(slots, pairs))
    per_query_head = sum(2 * 2 * s * sum(o is not None for o in pattern.branch_offsets(i, heads)) * d * 8
                         for i, s in enumerate(slots))  # fmt: skip
    assert cache.nbytes() < per_query_head if kv_heads < heads else cache.nbytes() == per_query_head
    with pytest.raises(ValueError, match=rf"key must have {kv_heads} \(key/value\) heads"):
        cache.append(q[:, :1, : kv_heads - 1], q[:, :1, : kv_heads - 1])
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        LayerKVCache(pattern, heads, 4)
