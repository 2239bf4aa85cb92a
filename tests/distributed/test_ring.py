"""RingDilatedAttention on spawned gloo process groups (2 and 4 ranks) against
the reference on the whole sequence: outputs and gradients in float64."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern, RingDilatedAttention
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, relative_error
from .spawn import init, spawn

# (world, seq, segment_lengths, dilation_rates, heads); shard = seq / world
CASES = [
    (2, 32, (4, 16, 32), (1, 2, 4), 3),  # local, local (w = shard), spanning 2
    (4, 32, (4, 16, 32), (1, 3, 2), 5),  # spanning 2 and 4; r=3 gives shards uneven counts
    (4, 32, (8, 24, 64), (2, 3, 5), 4),  # partial last segment (24 | 8 local), w > seq
    (4, 32, (16,), (6,), 2),  # one branch, r > heads, uneven counts
    (2, 32, (4, 8, 16, 32), (1, 2, 3, 4), 2),  # heads < branches
    (8, 64, (8, 16, 32, 64), (1, 2, 3, 4), 4),  # 8 ranks: local, spanning 2, 4 and 8
    # worlds that are no power of two, and partial last segments spanning ranks: they
    # hung when spanning ranks made their own subgroups
    (3, 24, (4, 16, 32), (1, 2, 4), 3),  # spanning 2 (and a local partial), spanning 3
    (4, 32, (8, 24, 32), (1, 2, 4), 3),  # spanning 3 with a local partial segment, spanning 4
    (5, 40, (8, 24, 16), (1, 3, 2), 4),  # partial [24, 40) spans ranks 3 and 4
    (6, 24, (8, 16, 24), (1, 2, 3), 5),  # spanning 2 and 4, partial [16, 24) spans 4 and 5
]

# (method, exchange): the fused path gathers or rotates spanning keys; gather always gathers
EXCHANGES = [("fused", "all_gather"), ("fused", "ring"), ("gather", "all_gather")]


def _run_cases(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        failures = []
        for case_world, seq, seg, dil, heads in CASES:
            if case_world != world:
                continue
            shard = seq // world
            for head_mode in ("grouped", "all"):
                for causal in (False, True):
                    # the worlds added for their geometry run with a padding mask only
                    for with_mask in (False, True) if world in (2, 4, 8) else (True,):
                        # the same seed on every rank: each builds the same global tensors
                        g = torch.Generator().manual_seed(
                            zlib.crc32(repr((seq, seg, head_mode, causal)).encode())
                        )
                        q, k, v, grad = (
                            torch.randn(2, seq, heads, 4, generator=g, dtype=torch.float64) for _ in range(4)
                        )
                        kpm = torch.rand(2, seq, generator=g) < 0.25 if with_mask else None
                        for x in (q, k, v):
                            x.requires_grad_()
                        exp = reference(
                            q, k, v, seg, dil, head_mode=head_mode, is_causal=causal, key_padding_mask=kpm
                        )
                        exp_grads = torch.autograd.grad(exp, (q, k, v), grad)
                        part = slice(rank * shard, (rank + 1) * shard)
                        ql, kl, vl = (x.detach()[:, part].clone().requires_grad_() for x in (q, k, v))
                        for method, exchange in EXCHANGES:
                            for x in (ql, kl, vl):
                                x.grad = None
                            out = ring_dilated_attention(
                                ql, kl, vl, DilatedPattern(seg, dil, head_mode), is_causal=causal,
                                key_padding_mask=None if kpm is None else kpm[:, part], method=method,
                                exchange=exchange,
                            )  # fmt: skip
                            out.backward(grad[:, part])
                            errors = [relative_error(out, exp[:, part])]
                            errors += [
                                relative_error(a.grad, b[:, part]) for a, b in zip((ql, kl, vl), exp_grads)
                            ]
                            if not torch.isfinite(out).all() or max(errors) > TOLERANCES[torch.float64]:
                                case = (method, exchange, seq, seg, dil, head_mode, causal, with_mask)
                                failures.append(f"{case}: {errors}")
        results[rank] = failures
    finally:
        dist.destroy_process_group()


def _run_errors(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        messages = []
        q = torch.randn(1, 8 + rank, 2, 4)  # shards of different lengths
        try:
            RingDilatedAttention([8], [1])(q, q, q)
        except ValueError as e:
            messages.append(str(e))
        q = torch.randn(1, 8, 2, 4)
        try:  # 12 neither divides the shard (8) nor is a multiple of it
            RingDilatedAttention([12], [1])(q, q, q)
        except ValueError as e:
            messages.append(str(e))
        try:
            RingDilatedAttention([8], [1])(q, q, q, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
        except ValueError as e:
            messages.append(str(e))
        try:
            RingDilatedAttention([8], [1])(q, q, q, is_causal=1)
        except TypeError as e:
            messages.append(str(e))
        results[rank] = messages
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4, 5, 6, 8])
def test_ring_matches_reference(world, tmp_path):
    results = spawn(_run_cases, world, tmp_path)
    assert sorted(results) == list(range(world))
    assert all(not failures for failures in results.values()), results


def test_ring_errors_on_every_rank(tmp_path):
    results = spawn(_run_errors, 2, tmp_path)
    for messages in results.values():
        assert len(messages) == 4
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
        with pytest.raises(ValueError, match=r"exchange must be one of \('all_gather', 'ring'\)"):
            make()


def test_ring_needs_initialized_distributed():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed initialized"):
        RingDilatedAttention([8], [1])(q, q, q)


def _run_multihead(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch import (
        MultiheadDilatedAttention,
        RingMultiheadDilatedAttention,
        create_multihead_dilated_attention,
    )

    init(rank, world, init_file)
    try:
        kw = {
            "batch_first": True,
            "segment_lengths": [4, 32],
            "dilation_rates": [1, 4],
            "dtype": torch.float64,
        }
        torch.manual_seed(0)  # the same weights on every rank
        single = MultiheadDilatedAttention(16, 4, **kw)
        x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grad = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        exp = single(x, x, x, is_causal=True)[0]
        exp.backward(grad)
        part = slice(rank * 16, (rank + 1) * 16)
        xl = x[:, part]
        errors = []
        for exchange in ("all_gather", "ring"):
            ring = RingMultiheadDilatedAttention(16, 4, exchange=exchange, **kw)
            ring.load_state_dict(single.state_dict())
            out = ring(xl, xl, xl, is_causal=True)[0]
            out.backward(grad[:, part])
            errors.append(relative_error(out, exp[:, part].detach()))
            for p_ring, p_single in zip(ring.parameters(), single.parameters()):
                summed = p_ring.grad.clone()
                dist.all_reduce(summed)  # what data-parallel training does
                errors.append(relative_error(summed, p_single.grad))
        factory = create_multihead_dilated_attention("ring", embed_dim=16, num_heads=4, **kw)
        need_weights_error = ""
        try:
            ring(xl, xl, xl, need_weights=True)
        except ValueError as e:
            need_weights_error = str(e)
        results[rank] = (max(errors), type(factory).__name__, need_weights_error)
    finally:
        dist.destroy_process_group()


def test_ring_multihead_matches_single_device(tmp_path):
    results = spawn(_run_multihead, 2, tmp_path)
    for max_error, factory_type, need_weights_error in results.values():
        assert max_error <= TOLERANCES[torch.float64]
        assert factory_type == "RingMultiheadDilatedAttention"
        assert "need_weights=True is not supported" in need_weights_error


def test_torchrun_example_matches_single_device():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(root / "examples/ring_torchrun.py"), "--seq", "2048"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    match = re.search(r"2 ranks, seq 2048: max \|ring - single device\| = (\S+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 1e-5


def _run_stack(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch import MultiheadDilatedAttention, RingMultiheadDilatedAttention

    from .stack import loss_and_grad_norm, stack

    init(rank, world, init_file)
    try:
        kw = {"segment_lengths": [8, 16, 64], "dilation_rates": [1, 2, 4], "dtype": torch.float64}
        x = torch.randn(2, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        single = loss_and_grad_norm(stack(MultiheadDilatedAttention, **kw), x, x.numel())
        shard = 64 // world
        ring = loss_and_grad_norm(
            stack(RingMultiheadDilatedAttention, **kw),
            x[:, rank * shard : (rank + 1) * shard],
            x.numel(),
            group=dist.group.WORLD,
        )
        results[rank] = (single, ring)
    finally:
        dist.destroy_process_group()


def test_eight_layer_stack_matches_single_device(tmp_path):
    results = spawn(_run_stack, 4, tmp_path)
    for (loss, norm), (ring_loss, ring_norm) in results.values():
        assert abs(ring_loss - loss) <= 1e-10 * abs(loss)
        assert abs(ring_norm - norm) <= 1e-10 * abs(norm)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_causal_balance_evens_out_pairs(size):
    """Member j's row i sees j·c + i + 1 keys under causality; after lending, the
    two members of each pair do the same work within 1 %, and agree on the plan."""
    from dilated_attention_pytorch.distributed.ring import _balance

    c = 1000
    counts = [c] * size
    work = [sum(j * c + i + 1 for i in range(c)) for j in range(size)]
    for me in range(size):
        plan = _balance(counts, me, list(range(size)), None, 0)
        partner = size - 1 - me
        if partner == me:
            assert plan is None
            continue
        other = _balance(counts, partner, list(range(size)), None, 0)
        assert plan is not None and other is not None
        assert (plan.first, plan.rows, plan.peer) == (other.first, other.rows, partner)
        assert plan.lender == (me > partner) != other.lender
        lender = max(me, partner)
        lent = sum(lender * c + i + 1 for i in range(plan.first, c))
        kept, borrower = work[lender] - lent, work[min(me, partner)] + lent
        assert max(kept, borrower) / min(kept, borrower) < 1.01, (kept, borrower)


def _run_frees_graph(rank: int, world: int, init_file: str, results: dict) -> None:
    import gc
    import weakref

    init(rank, world, init_file)
    gc.disable()  # memory must come back by reference counting, not at the next collection
    try:
        freed = []
        for exchange in ("all_gather", "ring"):
            q, k, v = (torch.randn(1, 16, 2, 4, requires_grad=True) for _ in range(3))
            out = RingDilatedAttention([4, 32], [1, 2], exchange=exchange)(q, k, v, is_causal=True)
            out.backward(torch.ones_like(out))
            probe = torch.empty(0)  # dies with the autograd node that holds it
            out.grad_fn.probe = probe
            ref = weakref.ref(probe)
            del out, probe
            freed.append(ref() is None)
        results[rank] = freed
    finally:
        gc.enable()
        dist.destroy_process_group()


def test_ring_frees_its_graph_without_gc(tmp_path):
    results = spawn(_run_frees_graph, 2, tmp_path)
    assert results == {0: [True, True], 1: [True, True]}


def _run_disagreeing(rank: int, world: int, init_file: str, results: dict) -> None:
    """Each call differs between the ranks in one way; every rank must raise, none hang."""
    init(rank, world, init_file)
    try:
        messages = []
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
        for call in calls:
            try:
                call()
                messages.append(None)
            except ValueError as e:
                messages.append(str(e))
        results[rank] = messages
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
            try:
                torch.autograd.grad(out.square().sum(), q, create_graph=True)
                messages.append(None)
            except RuntimeError as e:
                messages.append(str(e))
        results[rank] = messages
    finally:
        dist.destroy_process_group()


def test_double_backward_through_the_ring_raises_instead_of_a_wrong_value(tmp_path):
    results = spawn(_run_double_backward, 2, tmp_path, timeout_s=180)
    for messages in results.values():
        assert all(m is not None and "double backward (create_graph=True)" in m for m in messages), messages
