"""Packed documents: every implementation against the reference run on each
document on its own (outputs and gradients), both head modes, causal and not,
shared key/value heads, documents shorter than the smallest segment, one
document, many tiny ones; document ids; every rule on cu_seqlens."""

import itertools

import pytest
import torch

from dilated_attention_pytorch import cu_seqlens_from_document_ids, dilated_attention_varlen, functional
from dilated_attention_pytorch.core import packed, varlen
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import CPU_IMPLS, assert_close

PATTERN = ((4, 8, 16), (1, 2, 4))
LENGTHS = {
    "mixed": [1, 3, 17, 40, 8, 2, 33],  # shorter than every segment, partial last segments
    "one": [37],
    "tiny": [1, 2, 3] * 40,
}


def _packed(lengths, heads=6, kv_heads=2, seed=0):
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, heads, 4, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(total, kv_heads, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in "kv")
    return q, k, v, cu


def _per_document(q, k, v, cu, **kw):
    bounds = cu.tolist()
    return torch.cat([reference(q[None, a:b], k[None, a:b], v[None, a:b], *PATTERN, **kw)[0]
                      for a, b in itertools.pairwise(bounds)])  # fmt: skip


@pytest.mark.parametrize("impl", CPU_IMPLS, ids=[i.name for i in CPU_IMPLS])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", ["packed", "groups-exact", "groups-padded"])
def test_each_document_is_its_own_sequence(impl, lengths, head_mode, causal, path, monkeypatch):
    """``packed``: one varlen call per branch problem (core/packed.py), where the
    implementation's kernel has a varlen form; ``groups-*``: documents of one
    length as one batch, or every document padded to a power of two."""
    q, k, v, cu = _packed(LENGTHS[lengths])
    chosen = packed.packed_backend(q, v, impl.backend) if impl.method == "fused" else None
    if path == "packed" and chosen is None:
        pytest.skip(f"{impl.name} has no varlen form")
    ran = []
    if path == "packed":
        real = packed.packed_forward
        monkeypatch.setattr(packed, "packed_forward", lambda *a: ran.append(a[4].name) or real(*a))
    else:
        monkeypatch.setattr(functional, "packed_backend", lambda *a: None)
        monkeypatch.setattr(varlen, "EXACT_GROUPS", 10**9 if path == "groups-exact" else 0)
    grad_out = torch.randn(q.shape, dtype=q.dtype)
    expected = _per_document(q, k, v, cu, head_mode=head_mode, is_causal=causal)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out = dilated_attention_varlen(
        q, k, v, cu, max(LENGTHS[lengths]), *PATTERN, head_mode=head_mode, is_causal=causal,
        method=impl.method, backend=impl.backend,
    )  # fmt: skip
    assert_close(out, expected, torch.float64, f"{impl.name} output")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        assert_close(a, b, torch.float64, f"{impl.name} d{name}")
    assert ran == ([chosen.name] if path == "packed" else [])


@pytest.mark.slow
def test_thousands_of_tiny_documents_of_many_lengths():
    lengths = [1 + i % 50 for i in range(2000)]  # 50 distinct lengths: padded groups
    q, k, v, cu = _packed(lengths, heads=2, kv_heads=1)
    out = dilated_attention_varlen(q, k, v, cu, 50, *PATTERN, head_mode="all", is_causal=True)
    assert_close(out, _per_document(q, k, v, cu, head_mode="all", is_causal=True), torch.float64, "output")


def test_document_ids_give_cu_seqlens():
    ids = torch.tensor([7, 7, 7, 2, 2, 9, 4, 4, 4, 4])
    cu, longest = cu_seqlens_from_document_ids(ids)
    assert cu.tolist() == [0, 3, 5, 6, 10] and cu.dtype == torch.int32 and longest == 4
    with pytest.raises(ValueError, match="contiguous"):
        cu_seqlens_from_document_ids(torch.tensor([1, 1, 2, 1]))


Q, K = torch.zeros(10, 2, 4), torch.zeros(10, 1, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cu_seqlens": torch.tensor([0.0, 10.0])}, "cu_seqlens must be int32 or int64"),
        ({"cu_seqlens": torch.tensor([[0, 10]])}, r"cu_seqlens must be 1-D \(num_docs \+ 1,\)"),
        ({"cu_seqlens": torch.tensor([1, 10])}, "cu_seqlens must start at 0"),
        ({"cu_seqlens": torch.tensor([0, 6, 4, 10])}, "cu_seqlens must be non-decreasing"),
        ({"cu_seqlens": torch.tensor([0, 4, 9])}, r"cu_seqlens\[-1\] must equal total_tokens = 10"),
        ({"max_seqlen": 5}, r"max_seqlen must be >= the longest document \(6\)"),
        ({"query": torch.zeros(1, 10, 2, 4)}, r"query must be 3-D \(total_tokens, heads, head_dim\)"),
        ({"key": torch.zeros(9, 1, 4), "value": torch.zeros(9, 1, 4)}, "query's total_tokens"),
        (
            {"query": torch.zeros(10, 3, 4), "key": torch.zeros(10, 2, 4), "value": torch.zeros(10, 2, 4)},
            "heads % kv_heads must be 0",
        ),
    ],
)
def test_bad_input_errors_name_the_argument(kwargs, match):
    args = {"query": Q, "key": K, "value": K, "cu_seqlens": torch.tensor([0, 4, 10]), "max_seqlen": 6,
            "segment_lengths": PATTERN[0], "dilation_rates": PATTERN[1], **kwargs}  # fmt: skip
    with pytest.raises((ValueError, TypeError), match=match):
        dilated_attention_varlen(**args)
