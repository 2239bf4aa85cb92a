"""Property-based: every single-device implementation against the float64
reference over random patterns, lengths, head counts, masks, layouts and both
head modes (hypothesis, a fixed and derandomised budget)."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dilated_attention_pytorch import functional  # noqa: E402
from dilated_attention_pytorch.reference import dilated_attention_reference as reference  # noqa: E402
from dilated_attention_pytorch.sparse.layouts import expand_layout  # noqa: E402

from ..conftest import CPU_IMPLS, LAYOUTS, assert_close, make_strided  # noqa: E402

#: the CPU implementations, plus block-sparse (a random block layout, on the exact
#: gather path, and forward-only FlexAttention)
IMPLS = [i.name for i in CPU_IMPLS] + ["block-sparse-gather", "flex-forward"]


@st.composite
def calls(draw):
    branches = draw(st.integers(1, 3))
    segment_lengths = draw(st.lists(st.integers(1, 48), min_size=branches, max_size=branches))
    dilation_rates = draw(st.lists(st.integers(1, 6), min_size=branches, max_size=branches))
    return {
        "impl": draw(st.sampled_from(IMPLS)),
        "pattern": (segment_lengths, dilation_rates),
        "seq": draw(st.integers(1, 200)),
        "heads": draw(st.integers(1, 5)),  # often fewer heads than branches or than r
        "head_dim": draw(st.sampled_from([1, 3, 4, 8])),
        "batch": draw(st.integers(1, 2)),
        "head_mode": draw(st.sampled_from(["grouped", "all"])),
        "causal": draw(st.booleans()),
        "mask": draw(st.sampled_from(["none", "padding", "padding_all", "attn"])),
        "layouts": [draw(st.sampled_from(list(LAYOUTS))) for _ in range(3)],
        "seed": draw(st.integers(0, 2**16)),
    }


def _masks(kind, batch, seq, g):
    if kind == "padding":
        return {"key_padding_mask": torch.rand(batch, seq, generator=g) < 0.3}
    if kind == "padding_all":  # a sequence entirely padding: fully masked rows
        mask = torch.rand(batch, seq, generator=g) < 0.3
        mask[-1] = True
        return {"key_padding_mask": mask}
    if kind == "attn":
        return {"attn_mask": torch.rand(seq, seq, generator=g) < 0.3}
    return {}


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(calls())
def test_every_implementation_matches_reference(c):
    b, n, h, d = c["batch"], c["seq"], c["heads"], c["head_dim"]
    g = torch.Generator().manual_seed(c["seed"])
    made = [make_strided(name, (b, n, h, d), seed=c["seed"] + i) for i, name in enumerate(c["layouts"])]
    leaves, views = [leaf for leaf, _ in made], [view for _, view in made]
    kw = {"head_mode": c["head_mode"], "is_causal": c["causal"], **_masks(c["mask"], b, n, g)}
    ref_kw = dict(kw)
    impl_kw = dict(kw)
    if c["impl"] in ("block-sparse-gather", "flex-forward"):
        block_size = int(torch.randint(1, 17, (1,), generator=g))
        nb = -(-n // block_size)
        layout = torch.rand(nb, nb, generator=g) < 0.6
        impl_kw.update(block_layout=layout, block_size=block_size, method="gather")
        blocked = ~expand_layout(layout, block_size, n)
        ref_kw["attn_mask"] = blocked | kw["attn_mask"] if "attn_mask" in kw else blocked
    expected = reference(*(x.contiguous() for x in views), *c["pattern"], **ref_kw)
    if c["impl"] == "flex-forward":
        if "attn_mask" in kw:
            return  # FlexAttention takes no (seq, seq) mask on top of a layout here
        impl_kw["method"] = "flex"
        with torch.no_grad():
            out = functional.dilated_attention(*(x.float() for x in views), *c["pattern"], **impl_kw)
        assert_close(out, expected, torch.float32, f"{c} output")
        return
    impl = next((i for i in CPU_IMPLS if i.name == c["impl"]), None)
    if impl is None:
        out = functional.dilated_attention(*views, *c["pattern"], **impl_kw)
    else:
        out = impl(*views, *c["pattern"], **impl_kw)
    assert_close(out, expected, torch.float64, f"{c} output")
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    actual_grads = torch.autograd.grad(out, leaves, grad)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    # a gradient that is 0 up to rounding (dq, dk of a row with one key) is judged on
    # the scale of the others
    floor = 1e-2 * max(float(x.abs().max()) for x in expected_grads)
    for name, a, e in zip("qkv", actual_grads, expected_grads):
        assert_close(a, e, torch.float64, f"{c} d{name}", floor=max(floor, 1e-30))
