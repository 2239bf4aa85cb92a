"""Transformer layers and LongNet models: the nn.Transformer* contract (same
arguments, state_dict and results when the pattern is dense), MAGNETO, causality,
AMP autocast and torch.compile of a LongNetLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilated_attention_pytorch import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
)
from dilated_attention_pytorch.transformer import magneto_gain_

from .conftest import assert_close

F64 = {"dtype": torch.float64}
#: a single branch with one segment longer than any test sequence and no dilation: dense attention
DENSE = {"segment_lengths": (64,), "dilation_rates": (1,), "position_embedding": None}


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_with_a_dense_pattern_equals_nn(
    norm_first: bool, batch_first: bool, causal: bool
) -> None:
    torch.manual_seed(0)
    kw = {"dropout": 0.0, "batch_first": batch_first, "norm_first": norm_first, **F64}
    ours = DilatedTransformerEncoderLayer(16, 4, 32, **kw, **DENSE).eval()
    theirs = nn.TransformerEncoderLayer(16, 4, 32, **kw).eval()
    assert isinstance(ours, nn.TransformerEncoderLayer)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 10, 16, **F64)
    if not batch_first:
        x = x.transpose(0, 1)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64) if causal else None
    expected = theirs(x, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
    got = ours(x, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
    keep = ~pad if batch_first else ~pad.T  # nn's output at padded queries is unspecified
    assert_close(got[keep], expected[keep], torch.float64, "encoder layer")


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_with_a_dense_pattern_equals_nn(norm_first: bool) -> None:
    torch.manual_seed(0)
    kw = {"dropout": 0.0, "batch_first": True, "norm_first": norm_first, **F64}
    ours = DilatedTransformerDecoderLayer(16, 4, 32, **kw, **DENSE).eval()
    theirs = nn.TransformerDecoderLayer(16, 4, 32, **kw).eval()
    assert isinstance(ours, nn.TransformerDecoderLayer)
    theirs.load_state_dict(ours.state_dict())
    tgt, memory = torch.randn(2, 9, 16, **F64), torch.randn(2, 13, 16, **F64)
    mask = nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    expected = theirs(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    assert_close(
        ours(tgt, memory, tgt_mask=mask, tgt_is_causal=True), expected, torch.float64, "decoder layer"
    )


def test_longnet_with_dense_layers_equals_nn_transformer() -> None:
    torch.manual_seed(0)
    kw = {"dropout": 0.0, "activation": F.relu, "norm_first": False, "sub_layernorm": False, **F64}
    ours = LongNet(16, 4, 2, 2, 32, **kw, **DENSE).eval()
    theirs = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, **F64).eval()
    theirs.load_state_dict(ours.state_dict())
    src, tgt = torch.randn(11, 2, 16, **F64), torch.randn(7, 2, 16, **F64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    assert_close(ours(src, tgt, tgt_mask=mask), theirs(src, tgt, tgt_mask=mask), torch.float64, "LongNet")


def test_longnet_defaults_are_the_paper_base_setting() -> None:
    model = LongNet(num_encoder_layers=1, num_decoder_layers=1, device="meta")
    attn = model.encoder.layers[0].self_attn
    assert (model.d_model, model.nhead) == (768, 12)
    assert attn.attention.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert attn.attention.dilation_rates == (1, 2, 4, 6, 12)
    assert attn.norm is not None and model.encoder.layers[0].ffn_norm is not None  # MAGNETO sub-LN
    lm = LongNetLM(100, num_layers=1, device="meta")
    assert type(lm.layers[0].self_attn.position_embedding).__name__ == "XPos"


def test_longnet_forward_and_backward_dilated() -> None:
    torch.manual_seed(0)
    model = LongNet(32, 4, 2, 2, 64, segment_lengths=(4, 8), dilation_rates=(1, 2), batch_first=True)
    src, tgt = torch.randn(2, 19, 32), torch.randn(2, 12, 32)
    out = model(src, tgt, tgt_is_causal=True, tgt_mask=nn.Transformer.generate_square_subsequent_mask(12))
    assert out.shape == (2, 12, 32)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layers_stack_in_nn_transformer_encoder_with_nested_tensor_default() -> None:
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(
        16, 4, 32, batch_first=True, segment_lengths=(4,), dilation_rates=(2,)
    )
    with pytest.warns(UserWarning, match="activation_relu_or_gelu"):
        encoder = nn.TransformerEncoder(layer, 2).eval()  # nn warns it will not use nested tensors
    x = torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 6:] = True
    out = encoder(x, src_key_padding_mask=pad)
    # nn.TransformerEncoder deep-copies the layer: compare with its own copies
    expected = encoder.layers[1](encoder.layers[0](x, src_key_padding_mask=pad), src_key_padding_mask=pad)
    assert_close(out, expected, torch.float32, "stacked")


def test_sub_layernorm_needs_norm_first() -> None:
    with pytest.raises(ValueError, match="norm_first=True"):
        DilatedTransformerEncoderLayer(16, 4, sub_layernorm=True)
    with pytest.raises(ValueError, match="norm_first=True"):
        DilatedTransformerDecoderLayer(16, 4, sub_layernorm=True)


def test_magneto_gain_scales_value_out_and_ffn_weights_only() -> None:
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(
        8, 2, 16, norm_first=True, sub_layernorm=True, segment_lengths=(4,), dilation_rates=(1,)
    )
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    magneto_gain_([layer], 2.0)
    after = layer.state_dict()
    for name, value in after.items():
        if name == "self_attn.in_proj_weight":
            torch.testing.assert_close(value[:16], before[name][:16])
            torch.testing.assert_close(value[16:], 2 * before[name][16:])
        elif name in ("self_attn.out_proj.weight", "linear1.weight", "linear2.weight"):
            torch.testing.assert_close(value, 2 * before[name])
        else:
            torch.testing.assert_close(value, before[name])


@pytest.mark.slow
def test_longnet_lm_is_causal_and_trains() -> None:
    torch.manual_seed(0)
    model = LongNetLM(
        16,
        d_model=32,
        nhead=4,
        num_layers=2,
        dim_feedforward=64,
        segment_lengths=(4, 8, 16),
        dilation_rates=(1, 2, 4),
    )
    ids = torch.randint(0, 16, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 16
    with torch.no_grad():
        assert torch.equal(model(ids)[:, :15], model(changed)[:, :15])
        assert not torch.equal(model(ids)[:, 15:], model(changed)[:, 15:])
    # learn to repeat the previous token, where the first branch (w=4, r=1) sees it
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seen = torch.arange(24) % 4 != 0
    losses = []
    for _ in range(80):
        x = torch.randint(0, 16, (8, 24))
        loss = F.cross_entropy(model(x)[:, seen].flatten(0, 1), x[:, seen.nonzero()[:, 0] - 1].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_longnet_lm_tied_weights_and_errors() -> None:
    model = LongNetLM(
        10, d_model=16, nhead=2, num_layers=1, dim_feedforward=16, segment_lengths=(4,), dilation_rates=(1,)
    )
    assert model.lm_head.weight is model.embed.weight
    with pytest.raises(ValueError, match="vocab_size"):
        LongNetLM(0)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 0, dtype=torch.long))


def _small_lm(**kwargs) -> LongNetLM:
    """A seeded two-layer LongNetLM over 32 tokens with two branches."""
    torch.manual_seed(0)
    return LongNetLM(
        32, d_model=32, nhead=4, num_layers=2, dim_feedforward=64,
        segment_lengths=(8, 16), dilation_rates=(1, 2), **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_longnet_lm_under_cpu_autocast_bf16(head_mode: str) -> None:
    model = _small_lm(head_mode=head_mode)
    ids = torch.randint(0, 32, (2, 40))
    expected = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    err = (logits.float() - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err


@pytest.mark.slow
@pytest.mark.parametrize(("attention_type", "fullgraph"), [("standard", True), ("improved", False)])
def test_longnet_lm_torch_compile_matches_eager(attention_type: str, fullgraph: bool) -> None:
    """The gather path compiles into one graph; the fused path is kept out of
    graphs (docs/implementations.md), so the model compiles around it."""
    model = _small_lm(attention_type=attention_type)
    ids = torch.randint(0, 32, (2, 40))
    compiled = torch.compile(model, fullgraph=fullgraph)
    eager_loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    loss = F.cross_entropy(compiled(ids).flatten(0, 1), ids.flatten())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, eager_loss, torch.float32, "compiled loss")
    for g, g_eager in zip(grads, eager_grads):
        assert_close(g, g_eager, torch.float32, "compiled gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_longnet_lm_under_cuda_autocast(amp_dtype: torch.dtype, head_mode: str) -> None:
    torch.manual_seed(0)
    model = LongNetLM(64, d_model=128, nhead=4, num_layers=2, dim_feedforward=256,
                      segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4), head_mode=head_mode,
                      position_embedding="rotary", device="cuda")  # fmt: skip
    ids = torch.randint(0, 64, (2, 600), device="cuda")
    expected = model(ids)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    with torch.autocast("cuda", dtype=amp_dtype):
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    scaler.scale(loss).backward()
    assert logits.dtype == amp_dtype
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    err = (logits.float() - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err
