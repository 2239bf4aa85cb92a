"""Every implementation on inputs in the layouts users pass (transposed, permuted,
stepped, offset, expanded, packed), against the reference on contiguous copies:
outputs and gradients (to the tensors the views come from)."""

import pytest
import torch

from dilated_attention_pytorch import functional
from dilated_attention_pytorch.core import views
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, LAYOUTS, assert_close, make_strided

SHAPE = (2, 19, 4, 6)  # partial last segments; head_dim 6
PATTERN = ((4, 8, 12), (1, 2, 3))


def _views(layouts: tuple[str, str, str], dtype: torch.dtype = torch.float64, device: str = "cpu"):
    made = [make_strided(name, SHAPE, dtype, device, seed) for seed, name in enumerate(layouts)]
    return [leaf for leaf, _ in made], [view for _, view in made]


def _expected(leaves, views, head_mode, causal, g):
    out = reference(*(x.contiguous() for x in views), *PATTERN, head_mode=head_mode, is_causal=causal)
    return out, torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_every_layout_matches_reference(impl, layout, head_mode):
    leaves, views = _views((layout, layout, layout))
    expected, expected_grads = _expected(leaves, views, head_mode, True, g := torch.randn(SHAPE).double())
    out = impl(*views, *PATTERN, head_mode=head_mode, is_causal=True)
    assert_close(out, expected, torch.float64, f"{impl.name} {layout} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} {layout} d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
def test_mixed_layouts_match_reference(impl):
    names = list(LAYOUTS)
    for i in range(len(names)):
        layouts = (names[i], names[(i + 3) % len(names)], names[(i + 7) % len(names)])
        leaves, views = _views(layouts)
        g = torch.randn(SHAPE).double()
        expected, expected_grads = _expected(leaves, views, "all", False, g)
        out = impl(*views, *PATTERN, head_mode="all")
        assert_close(out, expected, torch.float64, f"{impl.name} {layouts} output")
        for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g), expected_grads):
            assert_close(a, b, torch.float64, f"{impl.name} {layouts} d{name}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flex_forward_on_every_layout(layout):
    _, views = _views((layout, layout, layout), torch.float32)
    with torch.no_grad():
        out = functional.dilated_attention(*views, *PATTERN, head_mode="all", method="flex")
    expected = reference(*(x.double() for x in views), *PATTERN, head_mode="all")
    assert_close(out, expected, torch.float32, f"flex {layout}")


def test_stride_rules_refuse_what_their_kernels_misread():
    from dilated_attention_pytorch.kernels import REGISTRY

    stepped = torch.randn(2, 3, 5, 16)[..., ::2]
    for backend in REGISTRY.values():
        rule = backend.strides
        assert rule.accepts(torch.randn(2, 3, 5, 8)), backend.name
        if rule.last_dim_contiguous:
            assert not rule.accepts(stepped), backend.name
            assert rule.conform(stepped).stride(-1) == 1
            assert torch.equal(rule.conform(stepped), stepped)
    # one element in: a 2-byte offset, off the 16-byte alignment the CUDA kernels need
    unaligned = torch.randn(2 * 3 * 5 * 8 + 1, dtype=torch.bfloat16)[1:].view(2, 3, 5, 8)
    assert not REGISTRY["sdpa_cudnn"].strides.accepts(unaligned)
    assert REGISTRY["sdpa_cudnn"].strides.conform(unaligned).data_ptr() % 16 == 0


def _branch_view(dest: torch.Tensor) -> torch.Tensor:
    # a call's rows in a (batch, seq, heads, head_dim) result: stepped positions and heads
    return dest[:, 3:83:2, 1::2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "head_dim,src_layout",
    [(64, "contiguous"), (64, "transposed"), (64, "expanded"), (6, "contiguous"), (65, "contiguous")],
)
def test_copy_rows_equals_copy(dtype, head_dim, src_layout):
    """Bit for bit ``dest.copy_(src)``, through wide elements or not (head_dim 6 and
    65 do not divide into 16 bytes in every dtype)."""
    src = torch.randn(2, 40, 6, head_dim).to(dtype)
    if src_layout == "transposed":
        src = src.transpose(1, 2).contiguous().transpose(1, 2)
    elif src_layout == "expanded":
        src = src[:, :1].expand_as(src)
    dest = torch.zeros(2, 100, 12, head_dim, dtype=dtype)
    expected = dest.clone()
    _branch_view(expected).copy_(src)
    views.copy_rows(_branch_view(dest), src)
    assert torch.equal(dest.view(torch.uint8), expected.view(torch.uint8))


def test_copy_rows_goes_wide_where_the_strides_allow(monkeypatch):
    widths = []
    real_view = torch.Tensor.view

    def view(self, *args):
        if len(args) == 1 and isinstance(args[0], torch.dtype):
            widths.append(args[0].itemsize)
        return real_view(self, *args)

    monkeypatch.setattr(torch.Tensor, "view", view)
    dest = torch.zeros(2, 100, 12, 64, dtype=torch.bfloat16)
    views.copy_rows(_branch_view(dest), torch.randn(2, 40, 6, 64).bfloat16())
    assert widths == [16, 16]
    widths.clear()
    odd = torch.zeros(2, 40, 6, 65, dtype=torch.bfloat16)[..., :64]  # head stride 65: one element wide
    views.copy_rows(odd, torch.randn(2, 40, 6, 64).bfloat16())
    assert widths == []
    views.copy_rows(_branch_view(dest), torch.randn(2, 40, 6, 64))  # another dtype: converted
    assert widths == []
    meta = torch.empty(
        2, 40, 6, 64, dtype=torch.bfloat16, device="meta"
    )  # not a device with complex128 copies
    views.copy_rows(meta, meta.clone())
    assert widths == []
    monkeypatch.setattr(views, "WIDE_COPY_MIN_BYTES", 2 * 40 * 6 * 64 * 2 + 1)  # a small copy: plain
    views.copy_rows(_branch_view(dest), torch.randn(2, 40, 6, 64).bfloat16())
    assert widths == []


def test_stacked_view_of_unbound_slices_is_their_tensor():
    x = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    q, k, v = x.unbind(2)
    whole = views.stacked_view((q, k, v), 2)
    assert whole is not None and torch.equal(whole, x) and whole.data_ptr() == x.data_ptr()
    assert torch.equal(views.stacked_view((q, k, v), -3), x)
    # slices of another dim of another layout: the view of torch.stack along the asked dim
    y = torch.randn(5, 2, 12, 6).transpose(0, 1)
    parts = (y[:, :, 0:4], y[:, :, 4:8], y[:, :, 8:12])
    for dim in (0, 2, 4):
        stacked = views.stacked_view(parts, dim)
        assert stacked is not None and torch.equal(stacked, torch.stack(parts, dim))


@pytest.mark.parametrize("case", ["reordered", "copied", "overlapping", "other_strides", "one", "meta"])
def test_stacked_view_refuses_what_is_not_one_tensors_slices(case):
    x = torch.randn(2, 5, 10, 6)
    q, k, v = x[:, :, 0:3], x[:, :, 3:6], x[:, :, 6:9]
    parts = {
        "reordered": (q, v, k),
        "copied": (q, k.clone(), v),
        "overlapping": (x[:, :, 0:4], x[:, :, 2:6], x[:, :, 4:8]),  # step 2 heads, 4 heads each
        "other_strides": (q, k, x[:, :, 6:10:2]),
        "one": (q,),
        "meta": tuple(torch.empty(2, 5, 3, 6, device="meta") for _ in range(3)),
    }[case]
    assert views.stacked_view(parts, 2) is None
