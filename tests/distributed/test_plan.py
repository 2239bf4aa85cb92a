"""The communication planner against what the code sends on gloo: every byte a
rank sends (point to point, all-to-all, all-gather) counted in the forward and
in the backward of each strategy, equal to :func:`plan_communication`'s."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.distributed.plan import (
    candidate_plans,
    choose_exchange,
    explain_exchange,
    plan_communication,
)
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, relative_error
from .spawn import init, spawn

# (seq, segment_lengths, dilation_rates, head_mode, heads, kv_heads, causal, padding)
CASES = [
    (32, (4, 16, 32), (1, 2, 4), "grouped", 4, 4, False, False),
    (32, (4, 16, 32), (1, 2, 4), "grouped", 4, 2, True, False),
    (48, (8, 24, 48), (1, 3, 2), "all", 4, 2, True, True),  # world 4: segments do not fit shards of 12
    (64, (8, 32, 64), (1, 3, 2), "all", 4, 4, True, True),
    (32, (16, 32), (2, 4), "all", 4, 4, False, True),
]


class _Counter:
    """Bytes this rank sends through the three collectives the exchanges use."""

    def __init__(self) -> None:
        self.sent = 0
        self._originals = (dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather)

    def __enter__(self) -> _Counter:
        p2p, all_to_all, gather = self._originals

        def batch_isend_irecv(ops):
            self.sent += sum(
                op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend
            )
            return p2p(ops)

        def all_to_all_single(output, input, *args, **kwargs):
            world = dist.get_world_size(kwargs.get("group"))
            self.sent += input.numel() * input.element_size() * (world - 1) // world
            return all_to_all(output, input, *args, **kwargs)

        def all_gather(outputs, tensor, *args, **kwargs):
            self.sent += tensor.numel() * tensor.element_size() * (len(outputs) - 1)
            return gather(outputs, tensor, *args, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = (
            batch_isend_irecv, all_to_all_single, all_gather,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        dist.batch_isend_irecv, dist.all_to_all_single, dist.all_gather = self._originals


def _run(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        measured = {}
        for index, (seq, seg, dil, mode, h, kv, causal, padding) in enumerate(CASES):
            pattern = DilatedPattern(seg, dil, mode)
            shard = seq // world
            gen = torch.Generator().manual_seed(index)
            q = torch.randn(2, seq, h, 8, generator=gen, dtype=torch.float64)
            k, v = (torch.randn(2, seq, kv, 8, generator=gen, dtype=torch.float64) for _ in "kv")
            mask = torch.rand(2, seq, generator=gen) < 0.2 if padding else None
            part = slice(rank * shard, (rank + 1) * shard)
            for exchange in ("all_gather", "ring", "ulysses", "auto"):
                ql, kl, vl = (x[:, part].clone().requires_grad_() for x in (q, k, v))
                try:
                    with _Counter() as forward:
                        out = ring_dilated_attention(
                            ql, kl, vl, pattern, is_causal=causal, exchange=exchange,
                            key_padding_mask=None if mask is None else mask[:, part],
                        )  # fmt: skip
                except ValueError:  # heads or segments that do not fit this world
                    measured[index, exchange] = None
                    continue
                with _Counter() as backward:
                    out.backward(torch.ones_like(out))
                measured[index, exchange] = (forward.sent, backward.sent)
                if exchange == "auto":  # the same function whatever it picked
                    expected = reference(
                        q, k, v, seg, dil, head_mode=mode, is_causal=causal, key_padding_mask=mask
                    )[:, part]
                    measured[index, "auto error"] = relative_error(out.detach(), expected)
        results[rank] = measured
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_planned_bytes_are_the_bytes_sent(world, tmp_path):
    results = spawn(_run, world, tmp_path)
    for index, (seq, seg, dil, mode, h, kv, causal, padding) in enumerate(CASES):
        pattern = DilatedPattern(seg, dil, mode)
        for exchange in ("all_gather", "ring", "ulysses"):
            kw = {"heads": h, "kv_heads": kv, "head_dim": 8, "batch": 2, "dtype": torch.float64}
            kw.update(is_causal=causal, key_padding=padding)
            if results[0][index, exchange] is None:  # refused by the code: refused by the planner
                with pytest.raises(ValueError):
                    plan_communication(pattern, seq, world, exchange, **kw)
                continue
            plan = plan_communication(pattern, seq, world, exchange, **kw)
            for rank in range(world):
                sent = results[rank][index, exchange]
                assert sent == (plan.forward[rank], plan.backward[rank]), (index, exchange, rank)
        # "auto" sends what the plan it picks says, and computes the function
        kw = {"heads": h, "kv_heads": kv, "head_dim": 8, "batch": 2, "dtype": torch.float64}
        plans = candidate_plans(pattern, seq, world, is_causal=causal, key_padding=padding, **kw)
        if results[0][index, "auto"] is None:  # refused: no strategy fits
            assert not plans
            continue
        best = choose_exchange(plans)
        for rank in range(world):
            assert results[rank][index, "auto"] == (best.forward[rank], best.backward[rank]), (index, rank)
            assert results[rank][index, "auto error"] <= TOLERANCES[torch.float64]


def test_planner_refusals_and_choice():
    pattern = DilatedPattern((4, 16), (1, 2))
    with pytest.raises(ValueError, match="heads"):
        plan_communication(pattern, 32, 4, "ulysses", heads=6, head_dim=8)
    with pytest.raises(ValueError, match="strategy"):
        plan_communication(pattern, 32, 2, "tree", heads=4, head_dim=8)
    spanning = DilatedPattern((1024, 16384), (1, 4))
    plans = [
        plan_communication(spanning, 1 << 14, 4, s, heads=8, head_dim=64)
        for s in ("all_gather", "ring", "ulysses")
    ]
    best = choose_exchange(plans)
    assert best.max_bytes == min(p.max_bytes for p in plans)
    with pytest.raises(ValueError, match="fits"):
        choose_exchange(plans, max_held_bytes=0)
    text = explain_exchange(spanning, 1 << 14, 4, heads=8, head_dim=64)
    assert f"auto picks {best.strategy!r}" in text and all(p.strategy in text for p in plans)
    # Ulysses moves q, k, v and the output once each way: (2·8 + 2·8)·n/P·d elements, 3/4 of them sent
    ulysses = plan_communication(spanning, 1 << 14, 4, "ulysses", heads=8, head_dim=64)
    assert ulysses.backward[0] == 32 * 4096 * 64 * 2 * 3 // 4


def _run_hybrid(rank: int, world: int, init_file: str, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
        i, j = mesh["ring"].get_local_rank(), mesh["ulysses"].get_local_rank()
        shard = slice((i * 2 + j) * 8, (i * 2 + j + 1) * 8)  # ring-major shards
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(2, 32, 4, 4, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(2, 32, 2, 4, generator=gen, dtype=torch.float64) for _ in "kv")
        mask = torch.rand(2, 32, generator=gen) < 0.2
        measured = {}
        for ring_exchange in ("all_gather", "ring"):
            for causal in (False, True):
                local = [x[:, shard].clone().requires_grad_() for x in (q, k, v)]
                with _Counter() as forward:
                    out = ring_dilated_attention(
                        *local, DilatedPattern((4, 16, 32), (1, 2, 4), "all"), is_causal=causal,
                        key_padding_mask=mask[:, shard], exchange="ulysses",
                        process_group=mesh["ulysses"].get_group(), ring_group=mesh["ring"].get_group(),
                        ring_exchange=ring_exchange,
                    )  # fmt: skip
                with _Counter() as backward:
                    out.backward(torch.ones_like(out))
                measured[ring_exchange, causal] = (i * 2 + j, forward.sent, backward.sent)
        results[rank] = measured
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four processes
def test_planned_bytes_of_the_hybrid_on_a_2x2_mesh(tmp_path):
    results = spawn(_run_hybrid, 4, tmp_path)
    pattern = DilatedPattern((4, 16, 32), (1, 2, 4), "all")
    for ring_exchange in ("all_gather", "ring"):
        for causal in (False, True):
            plan = plan_communication(
                pattern, 32, 2, "hybrid", heads=4, kv_heads=2, head_dim=4, batch=2, dtype=torch.float64,
                is_causal=causal, key_padding=True, ring_world=2, ring_exchange=ring_exchange,
            )  # fmt: skip
            for measured in results.values():
                index, forward, backward = measured[ring_exchange, causal]
                assert (forward, backward) == (plan.forward[index], plan.backward[index]), (
                    ring_exchange, causal, index,
                )  # fmt: skip


def _run_auto_on_nccl(rank: int, world: int, init_file: str, results: dict) -> None:
    torch.cuda.set_device(rank)
    init(rank, world, init_file, "nccl")
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 2048, 8, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in "qkv"
        )
        pattern = DilatedPattern((512, 2048), (1, 4))
        out = ring_dilated_attention(q, k, v, pattern, is_causal=True, exchange="auto")
        single = dilated_attention_single(q, k, v, pattern)
        results[rank] = (out.float() - single.float()).abs().max().item()
    finally:
        dist.destroy_process_group()


def dilated_attention_single(q, k, v, pattern):
    from dilated_attention_pytorch import dilated_attention

    return dilated_attention(q, k, v, pattern, is_causal=True)


@pytest.mark.gpu
def test_auto_takes_its_memory_budget_over_nccl(tmp_path):
    """On CUDA, "auto" reads the free memory of every GPU of the group (one
    all-reduce on NCCL) before it picks; one GPU here (a group of one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = spawn(_run_auto_on_nccl, 1, tmp_path)
    assert results[0] <= 1e-2  # the same bf16 function (a group of one exchanges nothing)
