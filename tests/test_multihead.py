"""The multihead modules as drop-ins for nn.MultiheadAttention."""

import copy

import pytest
import torch
from torch import nn

from dilated_attention_pytorch import (
    BlockSparseRingMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
)
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from .conftest import assert_close

MULTIHEAD = [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention]
IDS = ["standard", "improved"]
E, H, N, B = 16, 4, 12, 2


def _pair(cls, seq=N, **kw):
    """A stock nn.MultiheadAttention and ours with its weights; one dense branch
    covering the sequence, so both compute the same function."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dtype=torch.float64, **kw)
    ours = cls(E, H, dtype=torch.float64, segment_lengths=[seq], dilation_rates=[1], **kw)
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def _inputs(batch_first, seq=N, same=True):
    g = torch.Generator().manual_seed(1)
    shape = (B, seq, E) if batch_first else (seq, B, E)
    q = torch.randn(*shape, generator=g, dtype=torch.float64)
    if same:
        return q, q, q
    return (
        q,
        torch.randn(*shape, generator=g, dtype=torch.float64),
        torch.randn(*shape, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("same", [True, False], ids=["self", "cross"])
def test_equals_nn_multihead_attention(cls, batch_first, bias, same):
    mha, ours = _pair(cls, batch_first=batch_first, bias=bias)
    x = _inputs(batch_first, same=same)
    expected = mha(*x, need_weights=False)[0]
    out, weights = ours(*x)
    assert weights is None
    assert_close(out, expected, torch.float64, "output")
    g = torch.randn_like(out)
    exp_grads = torch.autograd.grad(expected, list(mha.parameters()), g)
    our_grads = torch.autograd.grad(out, list(ours.parameters()), g)
    for a, b in zip(our_grads, exp_grads):
        assert_close(a, b, torch.float64, "parameter grad")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_equals_nn_multihead_attention_with_masks(cls):
    mha, ours = _pair(cls)
    x = _inputs(False)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, -3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64)
    bool_mask = torch.rand(N, N, generator=torch.Generator().manual_seed(2)) < 0.3
    bool_mask.fill_diagonal_(False)
    per_head = torch.randn(B * H, N, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kw in (
        {"key_padding_mask": kpm},
        {"attn_mask": causal, "is_causal": True},
        {"attn_mask": bool_mask, "key_padding_mask": kpm},
        {"attn_mask": per_head},
        {"key_padding_mask": kpm.double().masked_fill(kpm, float("-inf"))},
    ):
        assert_close(ours(*x, **kw)[0], mha(*x, need_weights=False, **kw)[0], torch.float64, str(list(kw)))


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
@pytest.mark.parametrize("average", [True, False])
def test_need_weights_equals_nn_multihead_attention(cls, average):
    mha, ours = _pair(cls, batch_first=True)
    x = _inputs(True)
    out, w = ours(*x, need_weights=True, average_attn_weights=average)
    exp_out, exp_w = mha(*x, need_weights=True, average_attn_weights=average)
    assert_close(out, exp_out, torch.float64, "output")
    assert_close(w, exp_w, torch.float64, "weights")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_unbatched_input(cls):
    mha, ours = _pair(cls)
    x = torch.randn(N, E, dtype=torch.float64)
    kpm = torch.zeros(N, dtype=torch.bool)
    kpm[-2:] = True
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=True)
    exp_out, exp_w = mha(x, x, x, key_padding_mask=kpm)
    assert out.shape == (N, E) and w.shape == (N, N)
    assert_close(out, exp_out, torch.float64, "output")
    assert_close(w, exp_w, torch.float64, "weights")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_kdim_vdim_parameters_and_state_dict(cls):
    mha, ours = _pair(cls, kdim=6, vdim=10, batch_first=True)
    assert ours.in_proj_weight is None and ours.q_proj_weight.shape == (E, E)
    assert ours.k_proj_weight.shape == (E, 6) and ours.v_proj_weight.shape == (E, 10)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, 6, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, 10, generator=g, dtype=torch.float64)
    assert_close(ours(q, k, v)[0], mha(q, k, v)[0], torch.float64, "output")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_state_dict_round_trip_both_ways(cls):
    mha = nn.MultiheadAttention(E, H)
    ours = cls(E, H, segment_lengths=[4, 8], dilation_rates=[1, 2])
    assert ours.state_dict().keys() == mha.state_dict().keys()
    for name, p in ours.named_parameters():
        assert p.shape == dict(mha.named_parameters())[name].shape
    ours.load_state_dict(mha.state_dict())
    fresh = nn.MultiheadAttention(E, H)
    fresh.load_state_dict(ours.state_dict())
    for (name, a), b in zip(fresh.state_dict().items(), mha.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_dilated_pattern_matches_reference(cls, head_mode):
    torch.manual_seed(0)
    ours = cls(
        E,
        H,
        batch_first=True,
        segment_lengths=[4, 8],
        dilation_rates=[1, 2],
        head_mode=head_mode,
        dtype=torch.float64,
    )
    x = _inputs(True)[0]
    out, w = ours(x, x, x, is_causal=True, need_weights=True, average_attn_weights=False)
    q, k, v = ours._project(x, x, x)
    exp, exp_w = reference(q, k, v, [4, 8], [1, 2], head_mode=head_mode, is_causal=True, return_weights=True)
    assert_close(out, ours.out_proj(exp.flatten(-2)), torch.float64, "output")
    assert_close(w, exp_w, torch.float64, "weights")
    # the fast path (need_weights=False) gives the output the weights give
    assert_close(ours(x, x, x, is_causal=True)[0], out, torch.float64, "fast path vs weights path")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_layer_norm_option(cls):
    plain = cls(E, H, segment_lengths=[4], dilation_rates=[1])
    sub_ln = cls(E, H, segment_lengths=[4], dilation_rates=[1], layer_norm=True)
    assert isinstance(sub_ln.norm, nn.LayerNorm) and plain.norm is None
    x = torch.randn(N, B, E)
    torch.manual_seed(0)
    sub_ln.load_state_dict(
        {**plain.state_dict(), **{f"norm.{k}": v for k, v in sub_ln.norm.state_dict().items()}}
    )
    q, k, v = sub_ln._project(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
    inner = sub_ln.attention(q, k, v).flatten(-2)
    expected = sub_ln.out_proj(sub_ln.norm(inner)).transpose(0, 1)
    assert_close(sub_ln(x, x, x)[0], expected, torch.float32, "sub-LN output")


def _encoder_layers(cls, batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    layer.self_attn = cls(E, H, batch_first=batch_first, segment_lengths=[4, 8], dilation_rates=[1, 2])
    return layer


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_inside_transformer_encoder_layer(cls, training):
    layer = _encoder_layers(cls).train(training)
    x = torch.randn(B, N, E)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -4:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(N)
    with torch.no_grad():
        out = layer(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=True)
        # the same layer with PyTorch's fused fast path switched off calls self_attn for sure
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            expected = layer(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=True)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        # and by hand: norm(x + sa(x)), then the feed-forward block
        sa = layer.self_attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, is_causal=True)[0]
        h = layer.norm1(x + sa)
        by_hand = layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))
    assert_close(out, expected, torch.float32, "fast path off")
    assert_close(out, by_hand, torch.float32, "by hand")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_inside_transformer_encoder_and_decoder(cls):
    enc_layer = _encoder_layers(cls, batch_first=False)
    encoder = nn.TransformerEncoder(enc_layer, 2, enable_nested_tensor=False)
    dec_layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.0)
    dec_layer.self_attn = cls(E, H, segment_lengths=[4, 8], dilation_rates=[1, 2])
    decoder = nn.TransformerDecoder(dec_layer, 2)
    src, tgt = torch.randn(N, B, E), torch.randn(N, B, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(N)
    memory = encoder(src)
    out = decoder(tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True)
    assert out.shape == (N, B, E) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in decoder.parameters())
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_deepcopy_and_train_eval(cls):
    m = cls(E, H, dropout=0.5, segment_lengths=[4], dilation_rates=[2])
    c = copy.deepcopy(m).eval()
    x = torch.randn(N, B, E)
    assert torch.equal(c(x, x, x)[0], c(x, x, x)[0])
    assert len(c._forward_pre_hooks) == 1


@pytest.mark.slow
@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_torch_compile_matches_eager(cls):
    torch.manual_seed(0)
    m = cls(E, H, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2], head_mode="all")
    x = torch.randn(B, N, E, requires_grad=True)
    eager = m(x, x, x, is_causal=True)[0]
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(m)
    out = compiled(x, x, x, is_causal=True)[0]
    (g_compiled,) = torch.autograd.grad(out.sum(), x)
    assert_close(out, eager, torch.float32, "compiled output")
    assert_close(g_compiled, g_eager, torch.float32, "compiled grad")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"embed_dim": 10, "num_heads": 4}, "embed_dim must be divisible by num_heads"),
        ({"num_heads": 0}, "num_heads must be a positive int"),
        ({"add_bias_kv": True}, "add_bias_kv=True is not supported"),
        ({"add_zero_attn": True}, "add_zero_attn=True is not supported"),
        ({"dropout": 1.5}, r"dropout must be a float in \[0, 1\)"),
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, "same length"),
        ({"head_mode": "every"}, "head_mode must be one of"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"embed_dim": E, "num_heads": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(**args)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x: m(x, x[:-1], x[:-1]), "one length S >= the query's L"),
        (lambda m, x: m(x, x, x[:-1]), "one length S >= the query's L"),
        (lambda m, x: m(x[..., :-1], x, x), "query must have 16 features"),
        (lambda m, x: m(x[0], x, x), "must all be 3-D"),
        (
            lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, N, N, dtype=torch.bool)),
            r"attn_mask must have shape",
        ),
        (
            lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(B, N + 1, dtype=torch.bool)),
            "key_padding_mask",
        ),
    ],
)
def test_forward_errors(call, match):
    m = MultiheadDilatedAttention(E, H, segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ValueError, match=match):
        call(m, torch.randn(N, B, E))


def test_nested_tensor_input_is_refused():
    m = MultiheadDilatedAttention(E, H, batch_first=True, segment_lengths=[4], dilation_rates=[1])
    x = torch.nested.nested_tensor([torch.randn(5, E), torch.randn(3, E)])
    with pytest.raises(ValueError, match="enable_nested_tensor=False"):
        m(x, x, x)


def test_need_weights_is_refused_above_max_weights_bytes():
    m = ImprovedMultiheadDilatedAttention(16, 2, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(1, 64, 16)
    m.max_weights_bytes = 1000
    with pytest.raises(ValueError, match="over max_bytes"):
        m(x, x, x, need_weights=True)
    m.max_weights_bytes = None
    _, weights = m(x, x, x, need_weights=True)
    assert weights.shape == (1, 64, 64)
    big = ImprovedMultiheadDilatedAttention(
        16, 2, segment_lengths=[8], dilation_rates=[1], max_weights_bytes=None
    )
    assert big.max_weights_bytes is None


MULTIHEAD_CLASSES = [
    MultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
]


@pytest.mark.parametrize("cls", MULTIHEAD_CLASSES, ids=[c.__name__ for c in MULTIHEAD_CLASSES])
def test_is_an_nn_multihead_attention_with_its_state_dict(cls):
    ours = cls(16, 4, segment_lengths=[8], dilation_rates=[1])
    theirs = nn.MultiheadAttention(16, 4)
    assert isinstance(ours, nn.MultiheadAttention)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 8, 16)
    merged, kind = ours.merge_masks(
        torch.zeros(8, 8, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool), x
    )
    expected, expected_kind = theirs.merge_masks(
        torch.zeros(8, 8, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool), x
    )
    assert kind == expected_kind and torch.equal(merged, expected)


@pytest.mark.parametrize("cls", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention])
def test_torchscript_is_refused_with_what_to_use(cls):
    from dilated_attention_pytorch import ImprovedDilatedAttention

    m = cls(16, 2, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(1, 8, 16)
    for make in (lambda: torch.jit.script(m), lambda: torch.jit.trace(m, (x, x, x))):
        with pytest.raises(RuntimeError, match=r"TorchScript .* is not supported.*torch.compile"):
            make()
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.script(ImprovedDilatedAttention([8], [1]))


def test_inputs_of_another_dtype_than_the_module_are_named():
    m = ImprovedMultiheadDilatedAttention(16, 2, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"query has dtype torch.float64 but the module's parameters are"):
        m(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts by itself
        assert m(x.float(), x.float(), x.float())[0].dtype == torch.bfloat16


def test_float_masks_of_another_dtype_are_accepted_as_in_nn_multihead_attention():
    torch.manual_seed(0)
    ours = ImprovedMultiheadDilatedAttention(16, 2, batch_first=True, segment_lengths=[8], dilation_rates=[1])
    theirs = nn.MultiheadAttention(16, 2, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 16)
    mask = torch.randn(8, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 8, dtype=torch.float16)
    kpm[0, 2] = -torch.inf
    out = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm)[0]
    expected = theirs(x, x, x, attn_mask=mask.float(), key_padding_mask=kpm.float(), need_weights=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_grouped_query_heads(cls, head_mode):
    """num_kv_heads: k/v projections to num_kv_heads heads, each read by
    num_heads // num_kv_heads consecutive query heads; the same function as the
    reference on the projections (which repeats the key/value heads)."""
    torch.manual_seed(0)
    ours = cls(E, H, num_kv_heads=2, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2],
               head_mode=head_mode, dtype=torch.float64, position_embedding="rotary")  # fmt: skip
    head_dim = E // H
    shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    assert shapes["q_proj_weight"] == (E, E) and shapes["k_proj_weight"] == (2 * head_dim, E)
    assert shapes["v_proj_weight"] == (2 * head_dim, E) and shapes["in_proj_bias"] == (E + 4 * head_dim,)
    assert ours.in_proj_weight is None and "num_kv_heads=2" in repr(ours)
    x = _inputs(True)[0].requires_grad_()
    out, _ = ours(x, x, x, is_causal=True)
    q, k, v = ours._project(x, x, x)
    assert k.shape[2] == 2
    q, k = ours.position_embedding(q, k)
    exp = ours.out_proj(reference(q, k, v, [4, 8], [1, 2], head_mode=head_mode, is_causal=True).flatten(-2))
    assert_close(out, exp, torch.float64, "output")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *ours.parameters()], g),
                    torch.autograd.grad(exp, [x, *ours.parameters()], g)):  # fmt: skip
        assert_close(a, b, torch.float64, "gradient")
    # the weights path and the queries-at-the-end path agree
    out_w, _ = ours(x, x, x, is_causal=True, need_weights=True)
    assert_close(out_w, out, torch.float64, "need_weights")
    tail, _ = ours(x[:, -5:], x, x, is_causal=True)
    assert_close(tail, out[:, -5:], torch.float64, "last 5 queries")


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_default_num_kv_heads_keeps_the_nn_multihead_attention_layout(cls):
    mha = nn.MultiheadAttention(E, H)
    ours = cls(E, H, num_kv_heads=H, segment_lengths=[4], dilation_rates=[1])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in mha.state_dict().items()
    }


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_queries_at_the_end_of_longer_keys(cls):
    """Key length S > L: the queries are the last L positions (chunked prefill)."""
    mha, ours = _pair(cls, batch_first=True)
    x = _inputs(True)[0]
    full, _ = ours(x, x, x, is_causal=True)
    tail, _ = ours(x[:, -4:], x, x, is_causal=True)
    assert_close(tail, full[:, -4:], torch.float64, "last rows")
    mask = torch.zeros(4, N, dtype=torch.bool)
    mask[:, 0] = True
    masked, _ = ours(x[:, -4:], x, x, attn_mask=mask)
    expected, _ = mha(x[:, -4:], x, x, attn_mask=mask)  # one dense branch: nn's function
    assert_close(masked, expected, torch.float64, "rectangular attn_mask")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_kv_heads": 3}, "num_kv_heads must divide num_heads"),
        ({"num_kv_heads": 0}, "num_kv_heads must be a positive int"),
    ],
)
def test_num_kv_heads_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(E, H, **kwargs)


@pytest.mark.parametrize("cls", MULTIHEAD, ids=IDS)
def test_packed_documents(cls):
    """cu_seqlens: each document of one packed row is its own sequence (rotary is
    relative, so packed positions give each document's own result)."""
    torch.manual_seed(0)
    ours = cls(E, H, num_kv_heads=2, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2],
               head_mode="all", dtype=torch.float64, position_embedding="rotary")  # fmt: skip
    lengths = [5, 1, 13, 9]
    x = torch.randn(1, sum(lengths), E, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 19, 28], dtype=torch.int32)
    packed, _ = ours(x, x, x, is_causal=True, cu_seqlens=cu, max_seqlen=13)
    alone = torch.cat([ours(x[:, a:b], x[:, a:b], x[:, a:b], is_causal=True)[0] for a, b in
                       zip(cu[:-1].tolist(), cu[1:].tolist())], 1)  # fmt: skip
    assert_close(packed, alone, torch.float64, "packed vs one document at a time")
    g = torch.randn_like(packed)
    assert_close(
        torch.autograd.grad(packed, x, g)[0], torch.autograd.grad(alone, x, g)[0], torch.float64, "dx"
    )
    with pytest.raises(ValueError, match="takes no key_padding_mask"):
        ours(x, x, x, cu_seqlens=cu, key_padding_mask=torch.zeros(1, 28, dtype=torch.bool))
    with pytest.raises(ValueError, match="one packed row"):
        ours(x.expand(2, -1, -1), x.expand(2, -1, -1), x.expand(2, -1, -1), cu_seqlens=cu)


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_gradients_reach_the_projection_without_a_stack(monkeypatch, head_mode, batch_first):
    """One projection of queries, keys and values: the fused backward writes their
    gradients into one buffer that reaches the projection's backward as it is (no
    ``torch.stack`` copy of autograd's unbind), bit for bit the gradients of the
    plain unbind."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dilated_attention_pytorch import multihead

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = ImprovedMultiheadDilatedAttention(
        E, H, batch_first=batch_first, segment_lengths=[4, 8], dilation_rates=[1, 2], head_mode=head_mode
    ).double()
    x = _inputs(batch_first)[0].requires_grad_()
    results = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(multihead, "unbind", lambda t, dim: t.unbind(dim))
        out = m(x, x, x, is_causal=True)[0]
        with Ops() as ops:
            grads = torch.autograd.grad(out, [x, *m.parameters()], torch.ones_like(out))
        results.append(grads)
        assert ("stack" in ops.names) == plain
    assert all(torch.equal(a, b) for a, b in zip(*results))
