"""What every sequence-parallel call checks: bad arguments, ranks that disagree
(raised on every rank, never a hang), double backward refused."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern, RingDilatedAttention
from dilated_attention_pytorch.distributed import ring_dilated_attention

from .spawn import init, spawn

EXCHANGES = [("fused", "all_gather"), ("fused", "ring"), ("gather", "all_gather")]


def _error(call, kind: type[Exception] = ValueError) -> str | None:
    """The message ``call()`` raises (an exception of ``kind``), or None."""
    try:
        call()
    except kind as e:
        return str(e)
    return None


def _run_errors(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        uneven = torch.randn(1, 8 + rank, 2, 4)  # shards of different lengths
        q = torch.randn(1, 8, 2, 4)
        results[rank] = [
            _error(lambda: RingDilatedAttention([8], [1])(uneven, uneven, uneven)),
            # 12 neither divides the shard (8) nor is a multiple of it
            _error(lambda: RingDilatedAttention([12], [1])(q, q, q)),
            _error(
                lambda: RingDilatedAttention([8], [1])(q, q, q, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
            ),
            _error(lambda: RingDilatedAttention([8], [1])(q, q, q, is_causal=1), TypeError),
        ]
    finally:
        dist.destroy_process_group()


def test_ring_errors_on_every_rank(tmp_path):
    results = spawn(_run_errors, 2, tmp_path)
    for messages in results.values():
        assert len(messages) == 4 and None not in messages, messages
        assert "every rank must pass a shard of the same shape" in messages[0]
        assert "segment_lengths[0]=12" in messages[1] and "shard length 8" in messages[1]
        assert "attn_mask is not supported" in messages[2]
        assert "is_causal must be a bool" in messages[3]


def test_ring_exchange_is_checked():
    from dilated_attention_pytorch import RingMultiheadDilatedAttention

    for make in (
        lambda: RingDilatedAttention([8], [1], exchange="rotate"),
        lambda: RingMultiheadDilatedAttention(8, 2, segment_lengths=[8], dilation_rates=[1], exchange="x"),
    ):
        with pytest.raises(
            ValueError, match=r"exchange must be one of \('all_gather', 'ring', 'ulysses', 'auto'\)"
        ):
            make()


def test_ring_needs_initialized_distributed():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed initialized"):
        RingDilatedAttention([8], [1])(q, q, q)


def _run_disagreeing(rank: int, world: int, init_file: str, results: dict) -> None:
    """Each call differs between the ranks in one way; every rank must raise, none hang."""
    init(rank, world, init_file)
    try:
        q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
        kpm = torch.zeros(1, 8, dtype=torch.bool)
        calls = [
            lambda: ring_dilated_attention(q, q, q, DilatedPattern([16], [1 + rank])),
            lambda: ring_dilated_attention(
                *(q.to([torch.float64, torch.float32][rank]),) * 3, DilatedPattern([16], [1])
            ),
            lambda: ring_dilated_attention(
                q, q, q, DilatedPattern([16], [1]), key_padding_mask=kpm if rank else None
            ),
            lambda: ring_dilated_attention(q, q, q, DilatedPattern([16], [1], ["grouped", "all"][rank])),
            lambda: ring_dilated_attention(q, q, q, DilatedPattern([16], [1]), is_causal=bool(rank)),
            lambda: ring_dilated_attention(
                q, q, q, DilatedPattern([16], [1]), exchange=["all_gather", "ring"][rank]
            ),
            # rank 1's mask is invalid: it says why, rank 0 says which rank
            lambda: ring_dilated_attention(
                q,
                q,
                q,
                DilatedPattern([16], [1]),
                key_padding_mask=torch.zeros(1, 8 - rank, dtype=torch.bool),
            ),
        ]
        results[rank] = [_error(call) for call in calls]
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_raise_on_every_rank(tmp_path):
    results = spawn(_run_disagreeing, 2, tmp_path, timeout_s=180)
    for messages in results.values():
        assert None not in messages, messages
        for message, field in zip(messages[:6], ["pattern", "dtype", "key_padding_mask", "pattern",
                                                 "is_causal", "exchange"]):  # fmt: skip
            assert "these differ across the ranks" in message and field in message, message
    assert "key_padding_mask must have shape" in results[1][6]
    assert "rank(s) [1] of the process group refused their arguments" in results[0][6]


def _run_double_backward(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        messages = []
        for method, exchange in EXCHANGES:
            q = torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)
            out = ring_dilated_attention(q, q, q, DilatedPattern([16], [2]), method=method, exchange=exchange)
            penalty = functools.partial(torch.autograd.grad, out.square().sum(), q, create_graph=True)
            messages.append(_error(penalty, RuntimeError))
        results[rank] = messages
    finally:
        dist.destroy_process_group()


def test_double_backward_through_the_ring_raises_instead_of_a_wrong_value(tmp_path):
    results = spawn(_run_double_backward, 2, tmp_path, timeout_s=180)
    for messages in results.values():
        assert all(m is not None and "double backward (create_graph=True)" in m for m in messages), messages
