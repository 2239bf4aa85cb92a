"""Block-sparse modules against the reference with the expanded layout as
``attn_mask`` (outputs and gradients): every pattern, causal or not, both head
modes, masks, Hilbert order; the adaptive module; the multihead module; errors.
GPU tests (marked) run the FlexAttention path in bf16/fp16/fp32."""

import itertools
import math

import pytest
import torch
from torch import nn

from dilated_attention_pytorch import (
    BlockSparseAdaptive,
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    ImprovedDilatedAttention,
    create_block_sparse_attention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    dilated_attention,
)
from dilated_attention_pytorch.reference import dilated_attention_reference as reference
from dilated_attention_pytorch.sparse import layouts

from ..conftest import TOLERANCES, assert_close, grads, make_qkv

SEG, DIL = (16, 32, 72), (1, 2, 3)  # partial last segments at seq 72 + 8
SEQ, HEADS, BLOCK = 80, 5, 8
PATTERNS = ["local_window", "dilated_sparse", "global_local", "random"]


def _masked_reference(
    q, k, v, layout, block_size, *, is_causal=False, head_mode="grouped", attn_mask=None, **kw
):
    n = q.shape[1]
    blocked = ~layouts.expand_layout(layout, block_size, n)
    if attn_mask is not None:
        blocked = blocked | attn_mask
    return reference(q, k, v, SEG, DIL, head_mode=head_mode, is_causal=is_causal, attn_mask=blocked, **kw)


def _check_module(module, q, k, v, expected, dtype=torch.float64, **kw):
    out = module(q, k, v, **kw)
    assert_close(out, expected, dtype, "output")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g.to(out.dtype)), grads(expected, (q, k, v), g)):
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_matches_reference_with_the_layout_as_mask(pattern, causal, head_mode):
    module = BlockSparseRingDilatedAttention(
        SEG, DIL, block_size=BLOCK, pattern=pattern, sparsity=0.6, seed=2, head_mode=head_mode
    )
    q, k, v = make_qkv(2, SEQ, HEADS)
    layout = module.block_layout(SEQ, causal)
    assert layout.shape == (10, 10) and layouts.layout_sparsity(layout, causal) > 0.3
    expected = _masked_reference(q, k, v, layout, BLOCK, is_causal=causal, head_mode=head_mode)
    _check_module(module, q, k, v, expected, is_causal=causal)


@pytest.mark.parametrize("method", ["gather", "flex"])
@pytest.mark.parametrize("layout_shape", ["2d", "heads", "batch_heads"])
def test_functional_layouts_of_every_shape(method, layout_shape):
    q, k, v = make_qkv(2, SEQ, HEADS, requires_grad=method == "gather")
    g = torch.Generator().manual_seed(4)
    shape = {"2d": (10, 10), "heads": (HEADS, 10, 10), "batch_heads": (2, HEADS, 10, 10)}[layout_shape]
    layout = (torch.rand(shape, generator=g) < 0.5) | torch.eye(10, dtype=torch.bool)
    out = dilated_attention(
        q, k, v, SEG, DIL, head_mode="all", block_layout=layout, block_size=BLOCK, method=method
    )
    mask4 = layout
    while mask4.dim() < 4:
        mask4 = mask4[None]
    expected = _masked_reference(q, k, v, mask4, BLOCK, head_mode="all")
    assert_close(out, expected, torch.float64, f"{method} {layout_shape}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_flex_forward_on_cpu_matches_reference(causal, head_mode):
    # FlexAttention is forward-only on CPU; the GPU tests cover its gradients
    module = BlockSparseRingDilatedAttention(
        SEG, DIL, block_size=BLOCK, pattern="global_local", sparsity=0.5, head_mode=head_mode, backend="flex"
    )
    q, k, v = make_qkv(2, SEQ, HEADS, requires_grad=False)
    expected = _masked_reference(
        q, k, v, module.block_layout(SEQ, causal), BLOCK, is_causal=causal, head_mode=head_mode
    )
    assert_close(module(q, k, v, is_causal=causal), expected, torch.float64, "flex cpu")


# blocks a multiple of dilation x 128 (FlexAttention's tile): every tile lies in one
# block pair, so the mask_mod reads no layout (causal only, or no mask_mod at all); a
# single branch of dilation 1 returns FlexAttention's output as the output
TILE_ALIGNED = [
    ((2048,), (1,), 128),
    pytest.param((1024, 2048), (1, 2), 256, marks=pytest.mark.slow),
    pytest.param((512, 2048), (1, 4), 512, marks=pytest.mark.slow),
]


def _aligned_layout(n: int, block: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(block)
    layout = torch.rand(n // block, n // block, generator=g) < 0.4
    layout[1] = False  # a row block without keys (no diagonal): FlexAttention's own zeros
    return layout.to(device)


@pytest.mark.parametrize("seg,dil,block", TILE_ALIGNED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_flex_forward_on_cpu_with_tiles_within_blocks(seg, dil, block, causal, head_mode):
    n = 2048
    layout = _aligned_layout(n, block)
    q, k, v = make_qkv(1, n, 4, 16, requires_grad=False)
    out = dilated_attention(
        q,
        k,
        v,
        seg,
        dil,
        head_mode=head_mode,
        is_causal=causal,
        method="flex",
        block_layout=layout,
        block_size=block,
    )
    blocked = ~layouts.expand_layout(layout, block, n)
    expected = reference(q, k, v, seg, dil, head_mode=head_mode, is_causal=causal, attn_mask=blocked)
    assert_close(out, expected, torch.float64, "flex cpu, tiles within blocks")
    assert (out[:, block : 2 * block] == 0).all()


@pytest.mark.parametrize("backend", ["gather", "flex"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_on_top_of_the_layout(backend, kind):
    module = BlockSparseRingDilatedAttention(
        SEG, DIL, block_size=BLOCK, pattern="local_window", sparsity=0.5, backend=backend
    )
    q, k, v = make_qkv(2, SEQ, HEADS, requires_grad=backend == "gather")
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(2, SEQ, generator=g) < 0.3
    kpm[1, :40] = True  # rows of the first segments lose every key
    attn = torch.rand(SEQ, SEQ, generator=g) < 0.2
    if kind == "float":
        kpm = torch.zeros(2, SEQ, dtype=torch.float64).masked_fill(kpm, -math.inf)
        kpm[0, ::3] += 0.5  # finite biases too
        attn = torch.randn(SEQ, SEQ, generator=g, dtype=torch.float64).masked_fill(attn, -math.inf)
    layout = module.block_layout(SEQ, False)
    blocked = torch.zeros(SEQ, SEQ, dtype=torch.float64).masked_fill(
        ~layouts.expand_layout(layout, BLOCK, SEQ), -math.inf
    )
    attn_ref = blocked + (attn if kind == "float" else torch.zeros_like(blocked).masked_fill(attn, -math.inf))
    expected = reference(q, k, v, SEG, DIL, key_padding_mask=kpm, attn_mask=attn_ref)
    out = module(q, k, v, key_padding_mask=kpm, attn_mask=attn)
    assert_close(out, expected, torch.float64, f"{backend} {kind} masks")
    if backend == "gather":
        gr = torch.randn_like(expected)
        for name, a, b in zip("qkv", grads(out, (q, k, v), gr), grads(expected, (q, k, v), gr)):
            assert_close(a, b, torch.float64, f"d{name}")


def test_zero_sparsity_equals_dense_dilated_attention():
    for pattern in PATTERNS:
        module = BlockSparseRingDilatedAttention(SEG, DIL, block_size=BLOCK, pattern=pattern, sparsity=0.0)
        q, k, v = make_qkv(1, SEQ, HEADS, requires_grad=False)
        dense = ImprovedDilatedAttention(SEG, DIL)(q, k, v)
        assert_close(module(q, k, v), dense, torch.float64, pattern)


def test_callable_pattern():
    def stripes(n):
        out = torch.zeros(n, n, dtype=torch.bool)
        out[:, ::3] = True
        return out

    module = BlockSparseRingDilatedAttention(SEG, DIL, block_size=BLOCK, pattern=stripes)
    layout = module.block_layout(SEQ)
    assert torch.equal(layout, stripes(10) | torch.eye(10, dtype=torch.bool))
    q, k, v = make_qkv(1, SEQ, HEADS)
    _check_module(module, q, k, v, _masked_reference(q, k, v, layout, BLOCK))


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_hilbert_runs_in_curve_order_and_answers_in_callers_order(head_mode):
    h, w = 8, 10
    module = BlockSparseRingDilatedAttention(
        SEG, DIL, block_size=BLOCK, pattern="hilbert", sparsity=0.5, spatial_shape=(h, w), head_mode=head_mode
    )
    q, k, v = make_qkv(2, h * w, HEADS)
    order = layouts.hilbert_order(h, w)
    layout = module.block_layout(h * w)
    expected_curve = _masked_reference(
        q[:, order], k[:, order], v[:, order], layout, BLOCK, head_mode=head_mode
    )
    expected = expected_curve[:, torch.argsort(order)]
    _check_module(module, q, k, v, expected)


def test_hilbert_needs_matching_sequence_and_shape():
    with pytest.raises(
        ValueError, match="spatial_shape=\\(height, width\\) is required by pattern='hilbert'"
    ):
        BlockSparseRingDilatedAttention(SEG, DIL, pattern="hilbert")
    with pytest.raises(ValueError, match="only used by it"):
        BlockSparseRingDilatedAttention(SEG, DIL, pattern="random", spatial_shape=(4, 4))
    module = BlockSparseRingDilatedAttention(SEG, DIL, pattern="hilbert", spatial_shape=(4, 5))
    q, k, v = make_qkv(1, 21, 3)
    with pytest.raises(ValueError, match="needs seq = 20, got 21"):
        module(q, k, v)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pattern": "diagonal"}, "pattern must be one of"),
        ({"sparsity": 1.0}, "sparsity must be a float in"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"backend": "sdpa_cudnn"}, "backend of a block-sparse module must be"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseRingDilatedAttention(SEG, DIL, **kwargs)


def test_functional_layout_errors():
    q, k, v = make_qkv(1, SEQ, HEADS, requires_grad=False)
    with pytest.raises(ValueError, match="n_blocks = ceil\\(80 / block_size 8\\) = 10"):
        dilated_attention(
            q, k, v, SEG, DIL, block_layout=torch.ones(9, 9, dtype=torch.bool), block_size=8, method="gather"
        )
    with pytest.raises(ValueError, match="block_layout must be a bool tensor"):
        dilated_attention(q, k, v, SEG, DIL, block_layout=torch.ones(10, 10), block_size=8, method="gather")
    with pytest.raises(ValueError, match="runs with method='flex'"):
        dilated_attention(q, k, v, SEG, DIL, block_layout=torch.ones(10, 10, dtype=torch.bool), block_size=8)
    with pytest.raises(ValueError, match="method='flex' has no dropout"):
        dilated_attention(q, k, v, SEG, DIL, method="flex", dropout_p=0.1)
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="FlexAttention on CPU is forward-only"):
        dilated_attention(qg, k, v, SEG, DIL, method="flex")


def test_dropout_in_training_takes_the_exact_gather_path():
    module = BlockSparseRingDilatedAttention(SEG, DIL, block_size=BLOCK, attention_dropout=0.5, sparsity=0.5)
    q, k, v = make_qkv(1, SEQ, HEADS)
    torch.manual_seed(0)
    a = module(q, k, v)
    torch.manual_seed(0)
    b = module(q, k, v)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    module.eval()
    assert_close(
        module(q, k, v), _masked_reference(q, k, v, module.block_layout(SEQ), BLOCK), torch.float64, "eval"
    )


# ---------------------------------------------------------------- adaptive


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_adaptive_is_exact_over_its_chosen_blocks(causal, head_mode):
    module = BlockSparseAdaptive(SEG, DIL, block_size=BLOCK, sparsity=0.7, head_mode=head_mode)
    q, k, v = make_qkv(2, SEQ, HEADS)
    out = module(q, k, v, is_causal=causal)
    layout = module.last_layout()
    assert layout.shape == (2, HEADS, 10, 10) and layout.dtype == torch.bool
    assert layout.diagonal(dim1=-2, dim2=-1).all()
    if causal:
        assert not layout.triu(1).any()
        expected_kept = [max(1, math.ceil(0.3 * (i + 1))) for i in range(10)]
    else:
        expected_kept = [math.ceil(0.3 * 10)] * 10
    kept = layout.sum(-1)
    # top-k plus the diagonal when it was not among them
    assert ((kept == torch.tensor(expected_kept)) | (kept == torch.tensor(expected_kept) + 1)).all()
    expected = _masked_reference(q, k, v, layout, BLOCK, is_causal=causal, head_mode=head_mode)
    assert_close(out, expected, torch.float64, "adaptive output")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"adaptive d{name}")


def test_adaptive_picks_the_blocks_with_the_highest_scores():
    module = BlockSparseAdaptive((32,), (1,), block_size=8, sparsity=0.75)  # keep 1 of 4 + diagonal
    q = torch.zeros(1, 32, 1, 4, dtype=torch.float64)
    k = torch.zeros(1, 32, 1, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k[:, 16:24, :, 0] = 5.0  # key block 2 stands out for every query block
    module(q, k, k)
    layout = module.last_layout()[0, 0]
    assert layout[:, 2].all()
    assert layout.sum() == 4 + 3  # block 2 everywhere, plus the other diagonals


def test_adaptive_trains_on_a_toy_task():
    # retrieve each position's own value among 32 blocks' worth of candidates:
    # queries must learn to match their own key, through the chosen blocks
    torch.manual_seed(0)
    n, d = 64, 16
    attn = BlockSparseAdaptive((64,), (1,), block_size=8, sparsity=0.5)
    proj = nn.Linear(d, 3 * d)
    opt = torch.optim.Adam(proj.parameters(), lr=3e-2)
    losses = []
    for _ in range(80):
        x = torch.randn(8, n, d)
        q, k, v = proj(x).unflatten(-1, (3, 1, d)).unbind(2)
        loss = nn.functional.mse_loss(attn(q, k, v)[:, :, 0], x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------- multihead and factory


def test_multihead_module_is_a_drop_in_with_exact_weights():
    mha = nn.MultiheadAttention(40, HEADS, batch_first=True, dtype=torch.float64)
    sparse = BlockSparseRingMultiheadDilatedAttention(
        40,
        HEADS,
        batch_first=True,
        dtype=torch.float64,
        segment_lengths=SEG,
        dilation_rates=DIL,
        block_size=BLOCK,
        pattern="random",
        sparsity=0.5,
        seed=1,
    )
    sparse.load_state_dict(mha.state_dict())
    x = torch.randn(2, SEQ, 40, dtype=torch.float64)
    out, none = sparse(x, x, x)
    assert none is None
    out_w, weights = sparse(x, x, x, need_weights=True, average_attn_weights=False)
    assert_close(out_w, out, torch.float64, "need_weights output")
    layout = sparse.attention.block_layout(SEQ)
    allowed = layouts.expand_layout(layout, BLOCK, SEQ)
    assert (weights[..., ~allowed] == 0).all()
    rows = weights.sum(-1)  # 1, or 0 for positions a head's branch does not select
    assert (((rows - 1).abs() < 1e-12) | (rows == 0)).all() and (rows > 0.5).float().mean() > 0.5


def test_multihead_hilbert_weights_in_callers_order():
    sparse = BlockSparseRingMultiheadDilatedAttention(
        20,
        2,
        batch_first=True,
        dtype=torch.float64,
        segment_lengths=(16, 32),
        dilation_rates=(1, 2),
        block_size=4,
        pattern="hilbert",
        sparsity=0.5,
        spatial_shape=(4, 8),
    )
    x = torch.randn(1, 32, 20, dtype=torch.float64)
    out, _ = sparse(x, x, x, need_weights=True)
    assert_close(out, sparse(x, x, x)[0], torch.float64, "hilbert need_weights")
    # the weights are in the caller's order: recompute the output from them
    _, per_head = sparse(x, x, x, need_weights=True, average_attn_weights=False)
    v = nn.functional.linear(x, sparse.in_proj_weight[40:], sparse.in_proj_bias[40:]).unflatten(-1, (2, 10))
    manual = torch.einsum("bhqk,bkhd->bqhd", per_head, v).flatten(-2)
    assert_close(sparse.out_proj(manual), out, torch.float64, "output from the returned weights")


def test_factories():
    assert isinstance(
        create_dilated_attention("block_sparse_ring", sparsity=0.5), BlockSparseRingDilatedAttention
    )
    assert isinstance(
        create_multihead_dilated_attention("block_sparse_ring"), BlockSparseRingMultiheadDilatedAttention
    )
    m = create_block_sparse_attention("local_window", sparsity=0.8, block_size=64)
    assert isinstance(m, BlockSparseRingDilatedAttention) and m.layout_pattern == "local_window"
    assert m.sparsity == 0.8 and m.block_size == 64
    assert isinstance(create_block_sparse_attention("adaptive"), BlockSparseAdaptive)
    mh = create_block_sparse_attention("global_local", multihead=True, embed_dim=64, num_heads=4)
    assert (
        isinstance(mh, BlockSparseRingMultiheadDilatedAttention)
        and mh.attention.layout_pattern == "global_local"
    )
    with pytest.raises(ValueError, match="pattern='adaptive' has no multihead module"):
        create_block_sparse_attention("adaptive", multihead=True)


# ---------------------------------------------------------------- GPU (FlexAttention)

GPU_SEG, GPU_DIL = (512, 1024, 2048), (1, 2, 4)


def _gpu_case(dtype, label, causal, head_mode, module_cls=BlockSparseRingDilatedAttention, **kw):
    n, heads, d, block = 2048 + 320, 6, 64, 64  # partial last segments, several tiles per problem
    backend = "flex" if module_cls is BlockSparseRingDilatedAttention else None  # adaptive: auto
    module = module_cls(
        GPU_SEG, GPU_DIL, block_size=block, sparsity=0.7, head_mode=head_mode, backend=backend, **kw
    )
    if module_cls is BlockSparseRingDilatedAttention:
        module.block_layout(n, causal, "cuda")
    q, k, v = make_qkv(1, n, heads, d, device="cuda")
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    assert module._method(qd, kd, vd, 0.0) == "flex"  # per-head layouts too (adaptive)
    out = module(qd, kd, vd, is_causal=causal)
    layout = (
        module.last_layout() if module_cls is BlockSparseAdaptive else module.block_layout(n, causal, "cuda")
    )
    blocked = ~layouts.expand_layout(layout, block, n)
    expected = reference(q, k, v, GPU_SEG, GPU_DIL, head_mode=head_mode, is_causal=causal, attn_mask=blocked)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"{label} {dtype} output")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (qd, kd, vd), g.to(dtype)), grads(expected, (q, k, v), g)):
        assert_close(a, b, dtype, f"{label} {dtype} d{name}")


# Every pattern in bf16; fp16 and fp32 on one pattern. Patterns are layout
# contents, so they share compiled kernels; each dtype and causality compiles
# its own FlexAttention variant (tens of seconds each).
GPU_CASES = [
    (torch.bfloat16, *case) for case in itertools.product(PATTERNS, [False, True], ["grouped", "all"])
] + [
    (dtype, "random", causal, head_mode)
    for dtype in (torch.float16, torch.float32)
    for causal, head_mode in ((False, "all"), (True, "grouped"))
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,pattern,causal,head_mode", GPU_CASES, ids=lambda x: str(x).replace("torch.", "")
)
def test_gpu_flex_matches_reference(dtype, pattern, causal, head_mode):
    _gpu_case(dtype, pattern, causal, head_mode, pattern=pattern)


@pytest.mark.gpu
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_gpu_adaptive_matches_reference(head_mode):
    _gpu_case(torch.bfloat16, "adaptive", True, head_mode, module_cls=BlockSparseAdaptive)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gpu_flex_masks_and_empty_rows(kind):
    n, heads, d = 1024, 4, 64
    # grouped heads, so the first group's rows of batch 1 lose every key; FlexAttention
    module = BlockSparseRingDilatedAttention((256, 1024), (1, 2), block_size=64, sparsity=0.5)
    q, k, v = make_qkv(2, n, heads, d, device="cuda")
    kpm = torch.rand(2, n, device="cuda") < 0.3
    kpm[1, :300] = True  # whole segments without keys
    if kind == "float":
        kpm = torch.zeros(2, n, device="cuda", dtype=torch.float64).masked_fill(kpm, -math.inf)
        kpm[0, ::5] += 0.25
    qd, kd, vd = (x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    assert module._method(qd, kd, vd, 0.0) == "flex"
    assert module._method(qd, kd, vd, 0.0, attn_masked=True) == "gather"  # no Triton config fits
    out = module(qd, kd, vd, key_padding_mask=kpm.float() if kind == "float" else kpm)
    blocked = ~layouts.expand_layout(module.block_layout(n, False, "cuda"), 64, n)
    expected = reference(q, k, v, (256, 1024), (1, 2), key_padding_mask=kpm, attn_mask=blocked)
    assert_close(out, expected, torch.bfloat16, "masked output")
    no_key = (expected == 0).all(-1)  # (batch, seq, heads) with no key left in any branch
    assert no_key.any() and (out[no_key] == 0).all()
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (qd, kd, vd), g.bfloat16()), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.bfloat16, f"masked d{name}")


@pytest.mark.gpu
def test_gpu_auto_path_is_flex_and_matches_gather():
    module = BlockSparseRingDilatedAttention(GPU_SEG, GPU_DIL, block_size=128, sparsity=0.8)
    q, k, v = make_qkv(1, 4096, 4, 64, dtype=torch.bfloat16, device="cuda")
    assert module._method(q, k, v, 0.0) == "flex"
    out = module(q, k, v)
    module.backend = "gather"
    assert_close(out, module(q, k, v), torch.bfloat16, "flex vs gather")
    assert TOLERANCES[torch.bfloat16] == 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("seg,dil,block", TILE_ALIGNED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_flex_with_tiles_within_blocks(seg, dil, block, causal):
    n = 2048
    layout = _aligned_layout(n, block, "cuda")
    q, k, v = make_qkv(1, n, 4, 64, device="cuda")
    qd, kd, vd = (x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = dilated_attention(
        qd, kd, vd, seg, dil, is_causal=causal, method="flex", block_layout=layout, block_size=block
    )
    blocked = ~layouts.expand_layout(layout, block, n)
    expected = reference(q, k, v, seg, dil, is_causal=causal, attn_mask=blocked)
    assert_close(out, expected, torch.bfloat16, "tiles within blocks: output")
    assert (out[:, block : 2 * block] == 0).all()
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (qd, kd, vd), g.bfloat16()), grads(expected, (q, k, v), g)):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.bfloat16, f"tiles within blocks: d{name}")


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q: (q[0], q[0], q[0]), r"query must be 4-D \(batch, seq, heads, head_dim\)"),
        (lambda q: (q, q[:, :8], q[:, :8]), "seqlen_q must be <= seqlen_k"),
        (lambda q: (q[:, :0], q[:, :0], q[:, :0]), "query must have non-empty"),
        (lambda q: (q, q[..., :2], q), r"key must have shape \(batch, seqlen_k, kv_heads"),
        (lambda q: (q.tolist(), q, q), "query must be a Tensor"),
    ],
)
def test_adaptive_validates_before_building_its_layout(make, match):
    from dilated_attention_pytorch import BlockSparseAdaptive

    q = torch.randn(1, 16, 2, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        BlockSparseAdaptive([8], [1], block_size=4)(*make(q))


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_grouped_query_heads(adaptive, head_mode):
    """Key/value with fewer heads than the query: the reference on the same
    layout (adaptive: each query head scores the key head it reads)."""
    if adaptive:
        module = BlockSparseAdaptive(SEG, DIL, block_size=BLOCK, sparsity=0.7, head_mode=head_mode)
    else:
        module = BlockSparseRingDilatedAttention(
            SEG, DIL, block_size=BLOCK, pattern="dilated_sparse", sparsity=0.6, head_mode=head_mode
        )
    q = make_qkv(2, SEQ, 6)[0]
    k, v = make_qkv(2, SEQ, 2, seed=1)[:2]
    out = module(q, k, v, is_causal=True)
    layout = module.last_layout() if adaptive else module.block_layout(SEQ, True)
    expected = _masked_reference(q, k, v, layout, BLOCK, is_causal=True, head_mode=head_mode)
    assert_close(out, expected, torch.float64, "output")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"d{name}")
