"""Every CPU implementation against the reference: outputs and gradients."""

import math
import warnings
import weakref

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern, functional
from dilated_attention_pytorch import pattern as pattern_module
from dilated_attention_pytorch.core import fused, merge, ops, views
from dilated_attention_pytorch.core.merge import merge_by_lse
from dilated_attention_pytorch.kernels.base import ANY_STRIDES, KernelBackend
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import (
    CPU_IMPLS,
    HEAD_MODES_ALL_SLOW,
    PATTERNS,
    TOLERANCES,
    assert_close,
    grads,
    make_qkv,
    make_strided,
)

IMPL_IDS = [i.name for i in CPU_IMPLS]
#: the library's own slack (conftest sets it to 0 for every test)
DEFAULT_SLACK = fused.BACKWARD_CHUNK_SLACK_BYTES


def _masks(kind: str, batch: int, seq: int, heads: int) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "none":
        return {}
    if kind == "kpm_bool":
        return {"key_padding_mask": torch.rand(batch, seq, generator=g) < 0.3}
    if kind == "kpm_float":
        return {"key_padding_mask": torch.randn(batch, seq, generator=g, dtype=torch.float64)}
    if kind == "attn_bool":
        return {"attn_mask": torch.rand(seq, seq, generator=g) < 0.3}
    if kind == "attn_float_per_head":
        return {"attn_mask": torch.randn(batch, heads, seq, seq, generator=g, dtype=torch.float64)}
    raise AssertionError(kind)


def _check(impl, seg, dil, batch, seq, heads, dtype=torch.float64, **kw):
    q, k, v = make_qkv(batch, seq, heads, 4, dtype=torch.float64)
    expected = reference(q, k, v, seg, dil, **kw)
    g = torch.randn_like(expected)
    expected_grads = grads(expected, (q, k, v), g)
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    masks = {
        name: (m.to(dtype) if m.dtype.is_floating_point else m)
        for name, m in kw.items()
        if name in ("key_padding_mask", "attn_mask")
    }
    kw = {**kw, **masks}
    out = impl(qd, kd, vd, seg, dil, **kw)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"{impl.name} output")
    for name, actual, exp in zip("qkv", grads(out, (qd, kd, vd), g.to(dtype)), expected_grads):
        assert_close(actual, exp, dtype, f"{impl.name} d{name}")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("seg,dil,seq,heads", PATTERNS)
def test_matches_reference(impl, seg, dil, seq, heads, head_mode, causal):
    _check(impl, seg, dil, 2, seq, heads, head_mode=head_mode, is_causal=causal)


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("mask", ["kpm_bool", "kpm_float", "attn_bool", "attn_float_per_head"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_masks_match_reference(impl, mask, causal, head_mode):
    seg, dil = (4, 8, 6), (1, 2, 4)
    _check(impl, seg, dil, 2, 19, 4, head_mode=head_mode, is_causal=causal, **_masks(mask, 2, 19, 4))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_low_precision_within_tolerance(impl, dtype, head_mode):
    _check(impl, (8, 16), (1, 2), 2, 40, 4, dtype=dtype, head_mode=head_mode, is_causal=True)


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("head_mode", HEAD_MODES_ALL_SLOW)
def test_gradcheck(impl, head_mode):
    q, k, v = make_qkv(1, 7, 3, 2)
    kpm = torch.tensor([[False, False, True, False, False, False, True]])

    def fn(q, k, v):
        return impl(q, k, v, (2, 4, 7), (1, 2, 3), head_mode=head_mode, is_causal=True, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
def test_fully_masked_rows_give_zero_never_nan(impl, causal, head_mode):
    # batch 1 is entirely padding; in batch 0 the first 5 keys are padding (left padding)
    kpm = torch.zeros(2, 16, dtype=torch.bool)
    kpm[1] = True
    kpm[0, :5] = True
    q, k, v = make_qkv(2, 16, 4)
    out = impl(q, k, v, (4, 8), (1, 2), head_mode=head_mode, is_causal=causal, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expected = reference(q, k, v, (4, 8), (1, 2), head_mode=head_mode, is_causal=causal, key_padding_mask=kpm)
    assert_close(out, expected, torch.float64, "output")
    g = torch.randn_like(out)
    for actual, exp in zip(grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(actual, exp, torch.float64, "grad")


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
def test_non_contiguous_inputs(impl):
    # q, k, v as views into a packed (b, n, 3, h, d) projection, and a transposed layout
    packed = torch.randn(2, 20, 3, 4, 8, dtype=torch.float64)
    q, k, v = packed.unbind(2)
    expected = reference(q, k, v, (8, 16), (2, 4), head_mode="all")
    assert_close(impl(q, k, v, (8, 16), (2, 4), head_mode="all"), expected, torch.float64, "packed")
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert not qt.is_contiguous()
    assert_close(impl(qt, kt, vt, (8, 16), (2, 4), head_mode="all"), expected, torch.float64, "transposed")


@pytest.mark.parametrize("seq", [1, 2, 3])
@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
def test_tiny_sequences(impl, seq):
    _check(impl, (4, 8), (1, 2), 1, seq, 2, head_mode="all", is_causal=True)


def test_softmax_scale():
    q, k, v = make_qkv(1, 12, 2, requires_grad=False)
    for impl in CPU_IMPLS:
        out = impl(q, k, v, (4,), (2,), softmax_scale=0.3)
        assert_close(out, reference(q, k, v, (4,), (2,), softmax_scale=0.3), torch.float64, impl.name)


@pytest.mark.parametrize("head_mode", HEAD_MODES_ALL_SLOW)
@pytest.mark.parametrize("method", ["gather", "fused"])
def test_dropout_is_unbiased_and_seeded(method, head_mode):
    q, k, v = make_qkv(1, 8, 2, requires_grad=False)
    kw = {"head_mode": head_mode, "is_causal": True, "method": method}
    clean = reference(q, k, v, (4, 8), (1, 2), head_mode=head_mode, is_causal=True)
    torch.manual_seed(3)
    a = functional.dilated_attention(q, k, v, (4, 8), (1, 2), dropout_p=0.5, **kw)
    torch.manual_seed(3)
    b = functional.dilated_attention(q, k, v, (4, 8), (1, 2), dropout_p=0.5, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, clean)
    torch.manual_seed(0)
    runs = [functional.dilated_attention(q, k, v, (4, 8), (1, 2), dropout_p=0.3, **kw) for _ in range(3000)]
    mean = torch.stack(runs).mean(0)
    assert (mean - clean).abs().max() < 0.1 * clean.abs().max()


class _IntoPlaceMath:
    """The math backend with ``forward_into``/``backward_into`` that write through
    the given views, and a record of which calls took that path."""

    name, description = "math_into_place", "test double"
    strides = ANY_STRIDES
    WRITES_INTO_PLACE = True
    SUPPORTS_GQA = False

    def replay_state(self, length, device):
        return None

    def __init__(self) -> None:
        from dilated_attention_pytorch.kernels.math import MathBackend

        self.inner, self.into_calls = MathBackend(), 0

    def not_supported_reasons(self, spec):
        return []

    def forward(self, *args):
        return self.inner.forward(*args)

    def backward(self, *args):
        return self.inner.backward(*args)

    def forward_into(self, q, k, v, causal, scale, out):
        self.into_calls += 1
        part, lse, state = self.inner.forward(q, k, v, None, causal, scale)
        out.copy_(part)
        return lse, state

    def backward_into(self, grad_out, q, k, v, out, lse, causal, scale, state, grads):
        self.into_calls += 1
        for dest, part in zip(
            grads, self.inner.backward(grad_out, q, k, v, out, lse, None, causal, scale, state)
        ):
            dest.copy_(part)


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seg,dil,seq,heads", PATTERNS)
def test_into_place_backends_match_reference(monkeypatch, seg, dil, seq, heads, head_mode, causal, batch):
    """A backend that writes outputs and gradients into place (grouped heads, where
    the problem is a view) computes the same function."""
    backend = _IntoPlaceMath()
    monkeypatch.setattr(ops, "select_backends", lambda query, value, calls, *a: [backend] * len(calls))
    q, k, v = make_qkv(batch, seq, heads)
    expected = reference(q, k, v, seg, dil, head_mode=head_mode, is_causal=causal)
    g = torch.randn_like(expected)
    out = functional.dilated_attention(q, k, v, seg, dil, head_mode=head_mode, is_causal=causal)
    assert_close(out, expected, torch.float64, "output")
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"d{name}")
    # every pattern here has calls whose problems are views (of the output in
    # grouped mode, of a branch's compact rows in "all" mode)
    assert backend.into_calls > 0


def _head_chunk(q: torch.Tensor, pattern: DilatedPattern, kv: torch.Tensor | None = None) -> int:
    """The backward's heads per chunk for ``q`` (and keys/values like ``kv``), as the fused path takes it."""
    kv = q if kv is None else kv
    problems = ops._problems(q, kv, kv, None, None, pattern, True, None)
    return fused._merge_layout(problems, pattern, q)[1]


@pytest.mark.parametrize("slack", ["none", "default"])
@pytest.mark.parametrize("seg,dil,seq,heads", PATTERNS)
def test_all_mode_merges_every_branch_at_once(monkeypatch, seg, dil, seq, heads, slack):
    """Local "all"-mode problems go to compact rows: one merge of all branches in
    the forward, one sum per gradient and head chunk in the backward; with the
    default slack, inputs this small take all heads in one chunk."""
    if slack == "default":
        monkeypatch.setattr(fused, "BACKWARD_CHUNK_SLACK_BYTES", DEFAULT_SLACK)
    merged = []
    real = fused.merge_branches
    monkeypatch.setattr(fused, "merge_branches", lambda *a: merged.append(a[-1]) or real(*a))
    q, k, v = make_qkv(2, seq, heads)
    out = functional.dilated_attention(q, k, v, seg, dil, head_mode="all", is_causal=True)
    expected = reference(q, k, v, seg, dil, head_mode="all", is_causal=True)
    assert_close(out, expected, torch.float64, "output")
    assert merged == [range(heads)]
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"d{name}")
    chunk = _head_chunk(q, DilatedPattern(seg, dil, "all"))
    if slack == "default":
        assert chunk == heads
    chunks = [range(s, min(s + chunk, heads)) for s in range(0, heads, chunk)]
    assert merged[1:] == [c for c in chunks for _ in range(3)]


@pytest.mark.parametrize("kv_heads", [6, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", [64, 70])  # 70: partial last segments
def test_all_mode_reads_a_whole_branch_from_its_problems_result(monkeypatch, seq, batch, causal, kv_heads):
    """The branch one call fills whole (dilation 1 here) is merged from that call's
    result, forward and every backward chunk, not from a copy in compact rows; a
    branch with a partial last segment is two calls and keeps its rows."""
    adopted = []
    real = merge.BranchBuffers.adopt

    def adopt(self: merge.BranchBuffers, block: torch.Tensor) -> None:
        adopted.append(self.adopted)
        real(self, block)

    monkeypatch.setattr(merge.BranchBuffers, "adopt", adopt)
    g = torch.Generator().manual_seed(3)
    # strided inputs: heads-first storage, key/value heads shared by query heads
    q = torch.randn(batch, 6, seq, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k, v = (
        torch.randn(batch, seq, kv_heads, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in "kv"
    )
    seg, dil = (16, 32), (1, 2)
    out = functional.dilated_attention(q, k, v, seg, dil, head_mode="all", is_causal=causal)
    expected = reference(q, k, v, seg, dil, head_mode="all", is_causal=causal)
    assert_close(out, expected, torch.float64, "output")
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, (q, k, v), dout), grads(expected, (q, k, v), dout)):
        assert_close(a, b, torch.float64, f"d{name}")
    chunks = -(-6 // _head_chunk(q, DilatedPattern(seg, dil, "all"), k))
    # forward: output and lse; backward: dq, and dk, dv where heads have their own
    per_chunk = 1 if kv_heads != 6 else 3
    assert adopted == ([] if seq % 32 else [0] * (2 + chunks * per_chunk))


def test_head_chunks_grow_within_the_slack_only(monkeypatch):
    """Chunks hold at most 1.6 units, or the slack's bytes where those hold half the
    heads or more."""
    monkeypatch.setattr(fused, "BACKWARD_CHUNK_SLACK_BYTES", DEFAULT_SLACK)
    unit = 96 * 2**20  # one (1, 64K, 12, 64) bf16 tensor
    # LongNet's base pattern: 2 rows per position, 11/12 units per head of a chunk
    assert fused.merge_head_chunk(12, 2.0) == 1
    assert fused.merge_head_chunk(12, 2.0, 8 * unit) == 1  # 512K: the slack holds not one head more
    by_slack = int(DEFAULT_SLACK / (11 / 12 * unit))
    assert fused.merge_head_chunk(12, 2.0, unit) == by_slack == 11
    assert fused.merge_head_chunk(12, 2.0, unit // 2) == 12  # never more than the heads
    # 128K: the slack would hold 5 heads, fewer than half: not worth its memory
    assert int(DEFAULT_SLACK / (11 / 12 * 2 * unit)) == 5
    assert fused.merge_head_chunk(12, 2.0, 2 * unit) == 1
    # where one call holds less beside the compact rows, chunks hold more heads; the
    # slack counts every call's results and reaches no further
    assert fused.merge_head_chunk(12, 2.0, call_units=2.5) == 2  # 1.6 / (8.5 / 12)
    assert fused.merge_head_chunk(12, 2.0, 2 * unit, call_units=2.5) == 2
    assert fused.merge_head_chunk(12, 2.0, unit, call_units=2.5) == 11


class _WritesIntoPlace(KernelBackend):
    WRITES_INTO_PLACE = True


@pytest.mark.parametrize("seq", [64, 70])  # 70: partial last segments, no branch adopted
def test_a_call_holds_its_workspace_and_the_results_it_copies(seq):
    """:func:`fused._call_units`: the float32 dq workspace (2/r) of every call, and the
    results (3/r) of calls that are not the adopted branch's rows; a kernel that
    writes into place is charged as a copy (its workspace is not measured)."""
    q = torch.zeros(1, seq, 6, 8, dtype=torch.float64)
    pattern = DilatedPattern((16, 32, 64), (1, 2, 4), "all")
    problems = ops._problems(q, q, q, None, None, pattern, False, "math")
    rows, _, adopted = fused._merge_layout(problems, pattern, q)
    assert adopted == (None if seq % 64 else 0)
    # adopted: the dilation-2 branch's copies are the most (5 / 2); else the dilation-1 branch's
    assert fused._call_units(problems, rows, adopted) == (2.5 if adopted == 0 else 5.0)
    into_place = [fused.FusedProblem(p.call, _WritesIntoPlace(), p.bias, p.causal) for p in problems]
    assert fused._call_units(into_place, rows, None) == 5.0


class _CountsLiveResults:
    """The math backend, recording at each backward call how many earlier calls'
    gradients are still alive."""

    name, description = "math_counting", "test double"
    strides = ANY_STRIDES
    WRITES_INTO_PLACE = False
    SUPPORTS_GQA = False

    def __init__(self) -> None:
        from dilated_attention_pytorch.kernels.math import MathBackend

        self.inner, self.earlier, self.alive = MathBackend(), [], []

    def replay_state(self, length, device):
        return None

    def not_supported_reasons(self, spec):
        return []

    def forward(self, *args):
        return self.inner.forward(*args)

    def backward(self, *args):
        self.alive.append(sum(ref() is not None for ref in self.earlier))
        grads = self.inner.backward(*args)
        self.earlier += [weakref.ref(g) for g in grads]
        return grads


def test_all_mode_backward_frees_each_calls_gradients_before_the_next(monkeypatch):
    """The chunk rule (:func:`fused._call_units`) counts one call's gradients at a
    time: in "all" mode each call's are copied into compact rows and dropped
    before the next call; only the adopted branch's stay, as its rows."""
    backend = _CountsLiveResults()
    monkeypatch.setattr(ops, "select_backends", lambda query, value, calls, *a: [backend] * len(calls))
    q, k, v = make_qkv(1, 64, 6)
    pattern = DilatedPattern((16, 32, 64), (1, 2, 4), "all")
    out = functional.dilated_attention(q, k, v, pattern)
    expected = reference(q, k, v, pattern.segment_lengths, pattern.dilation_rates, head_mode="all")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"d{name}")
    chunk = _head_chunk(q, pattern)
    assert chunk < 6 and len(backend.alive) > 6 // chunk  # several chunks, several calls each
    # alive at a call: the gradients (dq, dk, dv) of the chunk's adopted call, if it came first
    assert max(backend.alive) <= 3, backend.alive


def test_merge_by_lse_all_empty_is_zero_with_finite_grads():
    outs = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lses = [
        torch.tensor([0.5, -math.inf, -math.inf], dtype=torch.float64, requires_grad=True) for _ in range(2)
    ]
    lses[1] = torch.tensor([1.0, 2.0, -math.inf], dtype=torch.float64, requires_grad=True)
    out, lse = merge_by_lse(outs, lses)
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))
    assert lse[2] == -math.inf
    torch.testing.assert_close(out[1], outs[1][1])
    w = torch.softmax(torch.tensor([0.5, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(out[0], w[0] * outs[0][0] + w[1] * outs[1][0])
    (out.sum() + lse[:2].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in outs + lses)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "heads_first"])
@pytest.mark.parametrize("head_mode,diagonal", [("grouped", False), ("all", False), ("all", True)])
@pytest.mark.parametrize("n", [64, 70])  # 70: partial last segments
def test_problem_views_select_the_calls_positions_and_heads(
    batch: int, layout: str, head_mode: str, diagonal: bool, n: int
) -> None:
    h, d = 6, 8
    x = torch.randn(batch, n, h, d, dtype=torch.float64)
    if layout == "heads_first":  # same values, other strides
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    pattern = pattern_module.as_pattern((16, 32), (1, 4), head_mode)
    calls = pattern.calls(n, h, diagonal=diagonal)
    assert any(c.offset_step for c in calls) == diagonal
    for call in calls:
        view = views.problem_view(x, call)
        # (batch, segments, length, heads, d): each head at its own positions
        expected = torch.stack(
            [
                x[:, torch.tensor(call.positions(j)).reshape(call.num_segments, call.length), head]
                for j, head in enumerate(call.heads())
            ],
            dim=3,
        )
        expected = expected.flatten(0, 1).transpose(1, 2)
        assert torch.equal(view, expected), call
        assert torch.equal(views.strided(x, call).flatten(0, 1).transpose(1, 2), expected), call
        if layout == "contiguous" and (batch == 1 or n % call.segment_length == 0):
            assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), call


Q = torch.zeros(1, 8, 2, 4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"query": Q[0]}, ValueError, r"query must be 4-D \(batch, seq, heads, head_dim\)"),
        ({"key": torch.zeros(1, 9, 2, 4)}, ValueError, r"key must have shape \(batch, seqlen_k"),
        ({"key": torch.zeros(1, 8, 2, 6), "value": torch.zeros(1, 8, 2, 6)}, ValueError, "query's batch"),
        ({"key": torch.zeros(2, 8, 2, 4), "value": torch.zeros(2, 8, 2, 4)}, ValueError, "query's batch"),
        (
            {
                "query": torch.zeros(1, 8, 3, 4),
                "key": torch.zeros(1, 8, 2, 4),
                "value": torch.zeros(1, 8, 2, 4),
            },
            ValueError,
            r"heads % kv_heads must be 0 .* heads = 3 \(query.shape\[2\]\) and kv_heads = 2",
        ),
        (
            {"query": torch.zeros(1, 9, 2, 4)},
            ValueError,
            r"seqlen_q must be <= seqlen_k .* seqlen_q = 9 \(query.shape\[1\]\)",
        ),
        (
            {"query": torch.zeros(1, 4, 2, 4), "block_layout": torch.ones(1, 1, dtype=torch.bool)},
            ValueError,
            "block_layout needs seqlen_q == seqlen_k",
        ),
        (
            {"query": torch.zeros(1, 4, 2, 4), "attn_mask": torch.zeros(8, 8, dtype=torch.bool)},
            ValueError,
            r"attn_mask must have shape \(seqlen_q, seqlen_k\)",
        ),
        ({"value": Q.double()}, ValueError, "share a dtype"),
        ({"query": Q.long()}, ValueError, "query must be a floating-point tensor"),
        (
            {
                "query": torch.zeros(0, 8, 2, 4),
                "key": torch.zeros(0, 8, 2, 4),
                "value": torch.zeros(0, 8, 2, 4),
            },
            ValueError,
            "query must have non-empty",
        ),
        (
            {"key_padding_mask": torch.zeros(1, 7, dtype=torch.bool)},
            ValueError,
            r"key_padding_mask must have shape",
        ),
        ({"attn_mask": torch.zeros(8, 7, dtype=torch.bool)}, ValueError, r"attn_mask must have shape"),
        ({"attn_mask": torch.zeros(2, 2, 8, 8, dtype=torch.bool)}, ValueError, r"attn_mask must have shape"),
        (
            {"attn_mask": torch.full((8, 8), 2, dtype=torch.long)},
            ValueError,
            r"attn_mask of dtype torch.int64 must hold only 0 and 1",
        ),
        (
            {"key_padding_mask": torch.tensor([[0.0, math.nan] + [0.0] * 6])},
            ValueError,
            "key_padding_mask holds NaN or \\+inf",
        ),
        ({"attn_mask": torch.full((8, 8), math.inf)}, ValueError, "attn_mask holds NaN or \\+inf"),
        (
            {"attn_mask": torch.zeros(8, 8, dtype=torch.complex64)},
            ValueError,
            "attn_mask must be bool, integer",
        ),
        ({"softmax_scale": 1e38}, ValueError, "softmax_scale must be at most 1e\\+06"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale must be a positive finite"),
        ({"softmax_scale": math.nan}, ValueError, "softmax_scale must be a positive finite"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\)"),
        ({"method": "fast"}, ValueError, "method must be one of"),
        ({"backend": "triton"}, ValueError, "backend must be one of"),
        ({"backend": "sdpa_flash"}, ValueError, "backend 'sdpa_flash' cannot run this call: .*cuda only"),
        ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
        ({"segment_lengths": (4, 8), "dilation_rates": (1,)}, ValueError, "same length"),
    ],
)
def test_bad_input_errors_name_the_argument(kwargs, error, match):
    args = {"query": Q, "key": Q, "value": Q, "segment_lengths": (4,), "dilation_rates": (1,)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        functional.dilated_attention(**args)


def test_tolerance_table_covers_tested_dtypes():
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_integer_masks_read_as_bool(impl, dtype):
    q, k, v = make_qkv(2, 12, 2, requires_grad=False)
    g = torch.Generator().manual_seed(3)
    kpm = torch.rand(2, 12, generator=g) < 0.3
    attn = torch.rand(12, 12, generator=g) < 0.2
    kw = {"head_mode": "all", "is_causal": True}
    expected = impl(q, k, v, (4, 8), (1, 2), key_padding_mask=kpm, attn_mask=attn, **kw)
    out = impl(q, k, v, (4, 8), (1, 2), key_padding_mask=kpm.to(dtype), attn_mask=attn.to(dtype), **kw)
    assert torch.equal(out, expected)
    assert_close(out, reference(q, k, v, (4, 8), (1, 2), key_padding_mask=kpm, attn_mask=attn, **kw),
                 torch.float64, "integer masks")  # fmt: skip


def test_negative_infinity_in_a_float_mask_removes_a_key():
    q, k, v = make_qkv(1, 8, 2, requires_grad=False)
    bias = torch.zeros(1, 8, dtype=torch.float64)
    bias[0, 3] = -math.inf
    out = functional.dilated_attention(q, k, v, (8,), (1,), key_padding_mask=bias)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 3] = True
    assert_close(out, functional.dilated_attention(q, k, v, (8,), (1,), key_padding_mask=mask), torch.float64)


def test_nan_in_values_of_padded_keys_propagates_as_in_sdpa():
    """docs/semantics.md: masked keys' values are read (0 · NaN = NaN), as in
    PyTorch's scaled_dot_product_attention; padding must hold finite values."""
    q, k, v = make_qkv(1, 8, 2, requires_grad=False)
    v = v.clone()
    v[0, 3] = math.nan
    kpm = torch.zeros(1, 8, dtype=torch.bool)
    kpm[0, 3] = True
    out = functional.dilated_attention(q, k, v, (8,), (1,), key_padding_mask=kpm)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=~kpm[:, None, None, :]
    ).transpose(1, 2)
    assert torch.equal(out.isnan(), sdpa.isnan())


@pytest.mark.parametrize("method", ["fused", "gather"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_return_lse_merges_with_another_attention(method, head_mode, grad):
    """return_lse: the merged lse, so that merging this attention with a second one
    (here: the same call on the other half of a dense pattern's keys) by
    merge_by_lse gives the attention over both; differentiable where recorded."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64).requires_grad_(grad) for _ in "qkv")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, 8:] = True  # first half of the keys
    kw = {"head_mode": head_mode, "method": method, "return_lse": True}
    with torch.set_grad_enabled(grad):
        out_a, lse_a = functional.dilated_attention(q, k, v, (16,), (1,), attn_mask=mask, **kw)
        out_b, lse_b = functional.dilated_attention(q, k, v, (16,), (1,), attn_mask=~mask, **kw)
        merged, _ = merge_by_lse([out_a, out_b], [lse_a, lse_b])
    expected = reference(q, k, v, (16,), (1,))
    assert lse_a.shape == (2, 16, 4) and lse_a.dtype == torch.float64
    assert_close(merged, expected, torch.float64, "merged")
    if grad:
        grad_out = torch.randn_like(expected)
        for name, a, b in zip(
            "qkv", grads(merged, (q, k, v), grad_out), grads(expected, (q, k, v), grad_out)
        ):
            assert_close(a, b, torch.float64, f"d{name}")


def test_return_lse_of_queries_at_the_end():
    q, k, v = make_qkv(1, 20, 2, seed=4)
    out, lse = functional.dilated_attention(q[:, -5:], k, v, (4, 8), (1, 2), head_mode="all", return_lse=True)
    full_out, full_lse = functional.dilated_attention(
        q, k, v, (4, 8), (1, 2), head_mode="all", return_lse=True
    )
    assert_close(out, full_out[:, -5:], torch.float64, "out")
    assert_close(lse, full_lse[:, -5:], torch.float64, "lse")


def test_likely_layout_mistakes_warn():
    """An SDPA-layout (batch, heads, seq, head_dim) tensor read as (batch, seq, heads,
    head_dim), and grouped heads fewer than branches, run but warn; a usual call does not."""
    sdpa_layout = torch.zeros(1, 4, 64, 8)  # 4 heads, 64 positions, in SDPA's order
    with pytest.warns(UserWarning, match=r"pass x.transpose\(1, 2\)"):
        functional.dilated_attention(sdpa_layout, sdpa_layout, sdpa_layout, (2048,), (1,))
    q = torch.zeros(1, 32, 2, 8)
    with pytest.warns(UserWarning, match=r"branches \[2\] \(the longest segments\) get no head"):
        functional.dilated_attention(q, q, q, (4, 8, 16), (1, 2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usual = torch.zeros(1, 64, 4, 8)
        functional.dilated_attention(usual, usual, usual, (16, 32), (1, 2))


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize(("start", "count", "kv_group"), [(0, 3, 1), (2, 4, 1), (5, 3, 1), (2, 4, 2)])
def test_head_slice_is_those_heads_of_the_layer(impl, head_mode, start, count, kv_group):
    """A pattern's head slice (a rank's heads under head parallelism) computes the
    layer's function on exactly those heads, outputs and gradients."""
    total, n = 8, 37
    pattern = DilatedPattern((4, 8, 16), (1, 2, 4), head_mode)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, n, total, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, n, total // kv_group, 4, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in "kv")  # fmt: skip
    heads, kv_heads = slice(start, start + count), slice(start // kv_group, (start + count) // kv_group)
    expected = reference(q, k, v, pattern.segment_lengths, pattern.dilation_rates, head_mode=head_mode,
                         is_causal=True)[:, :, heads]  # fmt: skip
    out = functional.dilated_attention(
        q[:, :, heads], k[:, :, kv_heads], v[:, :, kv_heads], pattern.head_slice(start, total),
        is_causal=True, method=impl.method, backend=impl.backend,
    )  # fmt: skip
    assert_close(out, expected, torch.float64, f"{impl.name} output")
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    for name, a, b in zip("qkv", grads(out, (q, k, v), grad_out), grads(expected, (q, k, v), grad_out)):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")


def test_head_slice_rules():
    pattern = DilatedPattern((4, 8), (1, 2), "grouped")
    assert pattern.head_slice(4, 8).branch_offsets(1, 4) == (1, 1, 1, 1)  # heads 4..7: the second group
    assert pattern.head_slice(2, 8).branch_offsets(0, 4) == (0, 0, None, None)
    assert DilatedPattern.from_op_args(*pattern.head_slice(2, 8).op_args()) == pattern.head_slice(2, 8)
    with pytest.raises(ValueError, match="does not fit in the layer's total_heads = 8"):
        pattern.head_slice(6, 8).branch_offsets(0, 4)
    with pytest.raises(ValueError, match="head_start needs total_heads"):
        DilatedPattern((4,), (1,), head_start=2)
    with pytest.raises(ValueError, match="head_start must be < total_heads = 4"):
        DilatedPattern((4,), (1,), head_start=4, total_heads=4)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "heads_innermost", "step_seq", "offset", "expand_batch"])
def test_diagonal_calls_match_reference(monkeypatch, causal, layout):
    """ "all" mode runs heads along diagonals (``offset_step = 1``) where that takes fewer
    calls: every head at its own positions, w % r != 0 (runs cut by length), a partial
    last segment and more heads than the rate; inputs as views of other layouts."""
    seg, dil, shape = (8, 16, 24), (1, 4, 6), (2, 58, 12, 4)
    calls = []
    real = ops._problems

    def spy(*args):
        problems = real(*args)
        calls.extend(p.call for p in problems)
        return problems

    monkeypatch.setattr(ops, "_problems", spy)
    q, k, v = (make_strided(layout, shape, seed=i)[1] for i in range(3))
    out = functional.dilated_attention(q, k, v, seg, dil, head_mode="all", is_causal=causal)
    assert any(c.offset_step for c in calls), "no diagonal call ran"
    expected = reference(q, k, v, seg, dil, head_mode="all", is_causal=causal)
    assert_close(out, expected, torch.float64, "output")
    g = torch.randn_like(expected)
    for name, actual, exp in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(actual, exp, torch.float64, f"d{name}")


@pytest.mark.parametrize("region_passes", [True, False], ids=["placed", "zero_filled"])
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seg,dil,seq,heads", PATTERNS)
def test_results_never_read_unwritten_memory(
    monkeypatch, seg, dil, seq, heads, head_mode, causal, region_passes
):
    """Every buffer the fused path allocates without a fill starts as NaN here: an
    output, lse or gradient element that no problem writes (a grouped head's
    unselected rows, a call without queries) would show. Grouped heads write each
    problem's whole region (:func:`~.core.place.place_result`) instead of a zero fill,
    unless the problems are small (``fused.PLACE_MIN_ELEMENTS``): then a zero fill
    and copies."""
    if not region_passes:
        monkeypatch.setattr(fused, "PLACE_MIN_ELEMENTS", 2**62)
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(math.nan) if x.dtype.is_floating_point else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: poisoned(real_new_empty(self, *a, **k))
    )
    placed = []
    real_place = fused.place_result
    monkeypatch.setattr(fused, "place_result", lambda *a, **k: placed.append(a[2]) or real_place(*a, **k))
    q, k, v = make_qkv(2, seq, heads)
    out = functional.dilated_attention(q, k, v, seg, dil, head_mode=head_mode, is_causal=causal)
    expected = reference(q, k, v, seg, dil, head_mode=head_mode, is_causal=causal)
    assert_close(out, expected, torch.float64, "output")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g), grads(expected, (q, k, v), g)):
        assert_close(a, b, torch.float64, f"d{name}")
    pattern = DilatedPattern(seg, dil, head_mode)
    calls = pattern.calls(seq, heads, diagonal=True)
    if head_mode == "grouped" and region_passes:  # every call placed in the forward and once per gradient
        assert sorted(placed, key=repr) == sorted(calls * 4, key=repr)
    else:
        assert placed == []
