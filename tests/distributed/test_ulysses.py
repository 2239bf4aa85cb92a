"""exchange="ulysses" (head parallelism) on spawned gloo groups of 2 and 4 ranks:
exact against the reference (fused and gather paths, both head modes, causal,
key padding, partial segments, shared key/value heads), the multihead module
equal to one process, misuse refused on every rank. The causal balance is
measured by benchmarks/ulysses_balance.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, relative_error
from .cases import check_strategy
from .spawn import init, spawn

# (world, seq, segment_lengths, dilation_rates, heads): heads and kv_heads (= heads // 2
# with the padding mask) divide by the world
CASES = [
    (2, 32, (4, 16, 32), (1, 2, 4), 4),  # every branch spans the heads of both ranks
    (2, 24, (8, 16), (1, 3), 8),  # partial last segment, r = 3
    (4, 32, (8, 24, 64), (2, 3, 5), 8),  # partial last segment, w > seq
    (4, 32, (16,), (6,), 4),  # one branch, r > heads per rank
]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ulysses_matches_reference(world, tmp_path):
    check_strategy([("fused", "ulysses"), ("gather", "ulysses")], world, tmp_path, CASES)


def _run_module_and_misuse(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch import MultiheadDilatedAttention, RingMultiheadDilatedAttention

    init(rank, world, init_file)
    try:
        kw = {
            "batch_first": True,
            "segment_lengths": [4, 32],
            "dilation_rates": [1, 4],
            "dtype": torch.float64,
        }
        torch.manual_seed(0)
        single = MultiheadDilatedAttention(16, 4, num_kv_heads=2, **kw)
        x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grad = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        exp = single(x, x, x, is_causal=True)[0]
        exp.backward(grad)
        part = slice(rank * 16, (rank + 1) * 16)
        xl = x[:, part]
        module = RingMultiheadDilatedAttention(16, 4, num_kv_heads=2, exchange="ulysses", **kw)
        module.load_state_dict(single.state_dict())
        out = module(xl, xl, xl, is_causal=True)[0]
        out.backward(grad[:, part])
        errors = [relative_error(out, exp[:, part].detach())]
        for p_mod, p_single in zip(module.parameters(), single.parameters()):
            summed = p_mod.grad.clone()
            dist.all_reduce(summed)  # what data-parallel training does
            errors.append(relative_error(summed, p_single.grad))
        # the same group from a DeviceMesh dimension (a 2-D mesh: data x sequence)
        from torch.distributed.device_mesh import init_device_mesh

        from dilated_attention_pytorch import RingDilatedAttention

        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data", "sequence"))
        core = RingDilatedAttention(
            [4, 32], [1, 4], exchange="ulysses", device_mesh=mesh, mesh_dim="sequence"
        )
        qkv = torch.randn(3, 2, 32, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        expected = reference(*qkv, [4, 32], [1, 4], is_causal=True)[:, part]
        errors.append(relative_error(core(*(x[:, part] for x in qkv), is_causal=True), expected))
        try:
            RingDilatedAttention([4], [1], device_mesh=mesh)
            mesh_error = ""
        except ValueError as e:
            mesh_error = str(e)
        # the local_attention form inside a DeepSpeed-style wrapper: (seq, batch, heads, d)
        # tensors, all-to-all around it (here this package's own exchange)
        from dilated_attention_pytorch.distributed.ulysses import (
            heads_to_sequence,
            local_attention,
            sequence_to_heads,
        )

        local = local_attention(DilatedPattern([4, 32], [1, 4]), is_causal=True)
        sbhd = [x[:, part].transpose(0, 1) for x in qkv]  # what the wrapper gets: (n/P, b, h, d)
        exchanged = [sequence_to_heads(x.transpose(0, 1)).transpose(0, 1) for x in sbhd]
        wrapped = heads_to_sequence(local(*exchanged).transpose(0, 1))
        errors.append(relative_error(wrapped, expected))
        # 3 query heads do not split over 2 ranks: the same error on every rank, no hang
        q = torch.zeros(1, 8, 3, 4)
        try:
            ring_dilated_attention(q, q, q, DilatedPattern((4,), (1,)), exchange="ulysses")
            misuse = ""
        except ValueError as e:
            misuse = str(e)
        results[rank] = (max(errors), misuse, mesh_error)
    finally:
        dist.destroy_process_group()


def test_ulysses_multihead_and_device_mesh_match_single_device_and_refuse_misuse(tmp_path):
    results = spawn(_run_module_and_misuse, 2, tmp_path)
    for max_error, misuse, mesh_error in results.values():
        assert max_error <= TOLERANCES[torch.float64]
        assert "device_mesh has 2 dimensions: name the sequence-parallel one with mesh_dim" in mesh_error
        assert "exchange='ulysses' splits heads over ranks" in misuse
        assert "heads (3) must divide by the process group's size (2)" in misuse


def _run_hybrid(rank: int, world: int, init_file: str, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
        i, j = mesh["ring"].get_local_rank(), mesh["ulysses"].get_local_rank()
        shard = slice((i * 2 + j) * 8, (i * 2 + j + 1) * 8)  # ring-major shards of 32 positions
        failures = []
        for head_mode in ("grouped", "all"):
            for causal in (False, True):
                for ring_exchange in ("all_gather", "ring"):
                    g = torch.Generator().manual_seed(5)
                    q, grad = (torch.randn(2, 32, 4, 4, generator=g, dtype=torch.float64) for _ in "qg")
                    k, v = (torch.randn(2, 32, 2, 4, generator=g, dtype=torch.float64) for _ in "kv")
                    kpm = torch.rand(2, 32, generator=g) < 0.2
                    for x in (q, k, v):
                        x.requires_grad_()
                    seg, dil = (4, 16, 32), (1, 2, 4)
                    exp = reference(
                        q, k, v, seg, dil, head_mode=head_mode, is_causal=causal, key_padding_mask=kpm
                    )
                    exp_grads = torch.autograd.grad(exp, (q, k, v), grad)
                    local = [x.detach()[:, shard].clone().requires_grad_() for x in (q, k, v)]
                    out = ring_dilated_attention(
                        *local, DilatedPattern(seg, dil, head_mode), is_causal=causal,
                        key_padding_mask=kpm[:, shard], exchange="ulysses",
                        process_group=mesh["ulysses"].get_group(), ring_group=mesh["ring"].get_group(),
                        ring_exchange=ring_exchange,
                    )  # fmt: skip
                    out.backward(grad[:, shard])
                    errors = [relative_error(out, exp[:, shard])]
                    errors += [relative_error(a.grad, b[:, shard]) for a, b in zip(local, exp_grads)]
                    if max(errors) > TOLERANCES[torch.float64]:
                        failures.append(f"{head_mode} causal={causal} {ring_exchange}: {errors}")
        # the multihead module with rotary positions: each rank's shard starts at its
        # ring-major position
        from dilated_attention_pytorch import MultiheadDilatedAttention, RingMultiheadDilatedAttention

        kw = {"segment_lengths": [4, 32], "dilation_rates": [1, 4], "batch_first": True}
        kw.update(dtype=torch.float64, position_embedding="rotary", num_kv_heads=2)
        torch.manual_seed(0)
        single = MultiheadDilatedAttention(16, 4, **kw)
        module = RingMultiheadDilatedAttention(
            16, 4, exchange="ulysses", process_group=mesh["ulysses"].get_group(),
            ring_group=mesh["ring"].get_group(), **kw,
        )  # fmt: skip
        module.load_state_dict(single.state_dict())
        x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        expected = single(x, x, x, is_causal=True)[0][:, shard]
        error = relative_error(module(x[:, shard], x[:, shard], x[:, shard], is_causal=True)[0], expected)
        if error > TOLERANCES[torch.float64]:
            failures.append(f"multihead with rotary: {error}")
        results[rank] = failures
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four processes
def test_hybrid_ulysses_and_ring_on_a_2x2_mesh_matches_reference(tmp_path):
    """Heads over the "ulysses" dimension, the sequence also over "ring" (all-gather
    or rotation), with shared key/value heads and key padding: exact."""
    results = spawn(_run_hybrid, 4, tmp_path)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(not failures for failures in results.values()), results
