"""ring_dilated_attention and the sequence-parallel modules in use: the multihead
module, an 8-layer stack, the torchrun example, memory freed without gc."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import RingDilatedAttention

from ..conftest import TOLERANCES, relative_error
from .spawn import init, spawn


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
    # --standalone: a free port for the rendezvous, not 29500 (which anything else may hold)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "examples/ring_torchrun.py"), "--seq", "2048"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
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


@pytest.mark.slow
def test_eight_layer_stack_matches_single_device(tmp_path):
    results = spawn(_run_stack, 4, tmp_path)
    for (loss, norm), (ring_loss, ring_norm) in results.values():
        assert abs(ring_loss - loss) <= 1e-10 * abs(loss)
        assert abs(ring_norm - norm) <= 1e-10 * abs(norm)


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
