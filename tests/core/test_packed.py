"""The varlen form of packed documents (core/packed.py): which kernel runs it,
inputs as users pass them (views, transposes, expanded heads), the padded form
of kernels without a varlen kernel, the registered operator under
torch.compile, and double backward. Exactness over every implementation and
pattern: tests/core/test_varlen.py."""

import itertools

import pytest
import torch

from dilated_attention_pytorch import dilated_attention_varlen, kernels
from dilated_attention_pytorch.core import packed, varlen
from dilated_attention_pytorch.kernels.varlen_padding import buckets
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import assert_close

PATTERN = ((4, 8, 16), (1, 2, 4))
LENGTHS = [1, 3, 17, 40, 8, 2, 33, 0, 16]


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _per_document(q, k, v, cu, **kw):
    return torch.cat([reference(q[None, a:b], k[None, a:b], v[None, a:b], *PATTERN, **kw)[0]
                      for a, b in itertools.pairwise(cu.tolist())])  # fmt: skip


VARLEN_CPU = [name for name, b in kernels.REGISTRY.items() if b.VARLEN and not b.not_supported_reasons(
    kernels.AttentionSpec("cpu", torch.float64, 4, varlen=True))]  # fmt: skip


def test_which_kernel_runs_packed_documents():
    q, v = torch.zeros(8, 4, 4, dtype=torch.float64), torch.zeros(8, 2, 4, dtype=torch.float64)
    # the kernel the groups of equal length would use, in its padded form
    assert packed.packed_backend(q, v, None).name == "sdpa_cpu_flash"
    assert packed.packed_backend(q, v, "math").name == "math"
    assert packed.packed_backend(q, v[..., :3], None) is None  # value head_dim: the gather path
    assert VARLEN_CPU == ["sdpa_cpu_flash", "math"]
    reasons = kernels.REGISTRY["sdpa_cudnn"].not_supported_reasons(
        kernels.AttentionSpec("cuda", torch.bfloat16, 64, compute_capability=(9, 0), varlen=True)
    )
    assert "has no varlen form (packed sequences in one call)" in reasons


@pytest.mark.parametrize("backend", VARLEN_CPU)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded-kv"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_inputs_as_users_pass_them(backend, layout, head_mode):
    total, g = sum(LENGTHS), torch.Generator().manual_seed(1)
    cu = _cu(LENGTHS)
    if layout == "transposed":  # (heads, total, d) storage seen as (total, heads, d)
        q, k, v = (
            torch.randn(h, total, 4, generator=g, dtype=torch.float64).transpose(0, 1) for h in (6, 2, 2)
        )
    elif layout == "sliced":  # every other row of a longer buffer, part of a wider head_dim
        q, k, v = (
            torch.randn(2 * total, h, 9, generator=g, dtype=torch.float64)[::2, :, 2:6] for h in (6, 2, 2)
        )
    else:  # one key/value head expanded to two (stride 0)
        q = torch.randn(total, 6, 4, generator=g, dtype=torch.float64)
        k, v = (torch.randn(total, 1, 4, generator=g, dtype=torch.float64).expand(total, 2, 4) for _ in "kv")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    views = [x.transpose(0, 1).transpose(0, 1) if layout == "transposed" else x for x in leaves]
    grad_out = torch.randn(total, 6, 4, generator=g, dtype=torch.float64)
    out = dilated_attention_varlen(*views, cu, 40, *PATTERN, head_mode=head_mode, backend=backend)
    expected = _per_document(*views, cu, head_mode=head_mode)
    assert_close(out, expected, torch.float64, "output")
    for name, a, b in zip(
        "qkv", torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)
    ):
        assert_close(a, b, torch.float64, f"d{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padded_form_equals_one_call_per_sequence(causal):
    """The padded varlen form (length buckets, key bias without causality)
    against each sequence on its own, outputs, lse and gradients."""
    math_backend = kernels.REGISTRY["math"]
    lengths = [1, 5, 2, 8, 3, 7, 1]
    seqs = kernels.PackedSequences(_cu(lengths), tuple(lengths), max(lengths))
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(sum(lengths), h, 4, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    out, lse, state = math_backend.forward_varlen(q, k, v, seqs, causal, 0.5)
    grads = math_backend.backward_varlen(do, q, k, v, out, lse, seqs, causal, 0.5, state)
    replayed = math_backend.backward_varlen(do, q, k, v, out, lse, seqs, causal, 0.5, None)
    for a, b in itertools.pairwise(_cu(lengths).tolist()):
        one = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
        o1, l1, s1 = math_backend.forward(*one, None, causal, 0.5)
        g1 = math_backend.backward(do[a:b].transpose(0, 1)[None], *one, o1, l1, None, causal, 0.5, s1)
        assert_close(out[a:b], o1[0].transpose(0, 1), torch.float64, "out")
        assert_close(lse[a:b], l1[0].t(), torch.float64, "lse")
        for name, x, y, z in zip("qkv", grads, replayed, g1):
            assert_close(x[a:b], z[0].transpose(0, 1), torch.float64, f"d{name}")
            assert_close(y[a:b], z[0].transpose(0, 1), torch.float64, f"replayed d{name}")


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [6, 2])
@pytest.mark.parametrize("in_place", ["none", "some", pytest.param("all", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["contiguous", pytest.param("strided", marks=pytest.mark.slow)])
def test_whole_segments_on_a_dense_kernel_beside_the_varlen_one(
    monkeypatch, head_mode, causal, kv_heads, in_place, layout
):
    """The split the GPU takes (cuDNN for whole segments beside the flash varlen
    kernel), here with the math varlen form beside the CPU flash kernel; long
    documents' whole segments read in place (none, those of at least 12 rows, every
    document's), from contiguous inputs or views with strided heads and rows."""
    min_rows = {"none": packed.IN_PLACE_MIN_ROWS, "some": 12, "all": 1}[in_place]
    monkeypatch.setattr(packed, "IN_PLACE_MIN_ROWS", min_rows)
    lengths = [40, 3, 17, 32, 16, 9, 64]
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(5)
    total = sum(lengths)

    def make(heads):
        if layout == "contiguous":
            return torch.randn(total, heads, 4, generator=g, dtype=torch.float64, requires_grad=True)
        # every other head of a (heads, total, d)-major buffer: strided heads and rows
        base = torch.randn(2 * heads, total, 4, generator=g, dtype=torch.float64)
        return base.transpose(0, 1)[:, ::2].requires_grad_()

    q = make(6)
    k, v = make(kv_heads), make(kv_heads)
    pattern = packed.DilatedPattern(*PATTERN, head_mode)
    calls = packed.packed_calls(tuple(cu.tolist()), pattern, 6, kv_heads, torch.device("cpu"), lambda n: True)
    assert any(c.seqs is not None for c in calls)
    if in_place == "none":
        assert all(c.dense is not None and not c.in_place for c in calls)
    elif in_place == "some":  # the 40- and 64-token documents' segments of >= 12 rows
        assert any(c.in_place for c in calls) and any(c.dense is not None for c in calls)
    else:
        assert any(c.in_place for c in calls)
    args = (q, k, v, cu, None, *pattern.op_args(), causal, 0.5, "math", "sdpa_cpu_flash")
    torch.library.opcheck(packed.varlen_forward_op, args)
    out, _ = packed.varlen_forward_op(*args)
    expected = _per_document(q, k, v, cu, head_mode=head_mode, is_causal=causal, softmax_scale=0.5)
    assert_close(out, expected, torch.float64, "output")
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad(out, (q, k, v), grad_out),
        torch.autograd.grad(expected, (q, k, v), grad_out),
    ):
        assert_close(a, b, torch.float64, f"d{name}")


def test_buckets_bound_padding():
    lengths = [1, 2, 3, 5, 8, 9, 16, 0, 17]
    found = buckets(lengths, torch.device("cpu"))
    assert [b.length for b in found] == [2, 4, 8, 16, 32]
    rows = torch.cat([b.rows for b in found]).sort().values
    assert rows.tolist() == list(range(sum(lengths)))  # every row once
    assert all(b.num_seqs * b.length < 2 * sum(n for n in lengths if b.length // 2 < n <= b.length) + 2
               for b in found)  # fmt: skip


def test_kernel_calls_do_not_grow_with_documents():
    """One call per (branch, offset, head part), however many documents."""
    pattern = packed.DilatedPattern(*PATTERN, "all")
    few = packed.packed_calls(tuple(_cu([40]).tolist()), pattern, 6, 2, torch.device("cpu"))
    many = packed.packed_calls(tuple(_cu([3, 5, 40] * 200).tolist()), pattern, 6, 2, torch.device("cpu"))
    assert len(few) == len(many) == len(packed.packed_calls(tuple(_cu([7] * 9).tolist()), pattern, 6, 2,
                                                             torch.device("cpu")))  # fmt: skip


def test_compiles_with_no_graph_break():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    cu = _cu(LENGTHS)
    q, k, v = (torch.randn(sum(LENGTHS), h, 4, generator=g, requires_grad=True) for h in (6, 2, 2))

    def f(q, k, v, cu):
        return dilated_attention_varlen(q, k, v, cu, None, *PATTERN, head_mode="all", is_causal=True)

    explained = torch._dynamo.explain(f)(q, k, v, cu)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v, cu), f(q, k, v, cu)
    assert_close(out, expected, torch.float32, "compiled output")
    grad_out = torch.randn_like(out)
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad(out, (q, k, v), grad_out),
        torch.autograd.grad(expected, (q, k, v), grad_out),
    ):
        assert_close(a, b, torch.float32, f"compiled d{name}")


def test_double_backward_differentiates_the_same_function():
    lengths = [3, 6, 2]
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(11, h, 4, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))

    def f(q, k, v):
        return dilated_attention_varlen(q, k, v, cu, 6, (2, 4), (1, 2), head_mode="all", is_causal=True)

    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_bad_cu_seqlens_raise_through_the_operator():
    q, k = torch.zeros(10, 2, 4), torch.zeros(10, 1, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal total_tokens = 10"):
        dilated_attention_varlen(q, k, k, torch.tensor([0, 4, 9]), None, *PATTERN, backend="math")


def test_backend_choice_is_a_compile_time_constant():
    # the marker torch.compiler.assume_constant_result sets, which packed.py sets itself
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert marked._dynamo_marked_constant is True
    assert packed._packed_backend_names._dynamo_marked_constant is True


def test_cu_seqlens_is_read_once_per_tensor(monkeypatch):
    """The backward (and later steps) reuse the forward's read of the same
    cu_seqlens object; an in-place change is read again."""
    reads = []
    real = varlen.check_cu_seqlens
    monkeypatch.setattr(varlen, "check_cu_seqlens", lambda *a: reads.append(1) or real(*a))
    cu = _cu([5, 11])
    q = torch.randn(16, 2, 4, requires_grad=True)
    out = dilated_attention_varlen(q, q, q, cu, None, (4,), (1,), backend="math")
    out.sum().backward()
    dilated_attention_varlen(q, q, q, cu, None, (4,), (1,), backend="math")
    assert len(reads) == 1
    cu[1] = 7  # in place: a new version
    dilated_attention_varlen(q, q, q, cu, None, (4,), (1,), backend="math")
    assert len(reads) == 2
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal total_tokens = 15"):
        dilated_attention_varlen(q[:15], q[:15], q[:15], cu, None, (4,), (1,), backend="math")
    with pytest.raises(ValueError, match=r"max_seqlen must be >= the longest document \(9\)"):
        dilated_attention_varlen(q, q, q, cu, 8, (4,), (1,), backend="math")
    with pytest.raises(ValueError, match="cu_seqlens must be on the inputs' device meta"):
        varlen.host_bounds(cu, 16, None, torch.device("meta"))  # seen before, on another device
