"""Ring on NCCL (2 GPUs, bf16) against an fp32 reference on one GPU, with the rule
max|ring - ref| <= 2 * max|single_gpu - ref| for outputs and input gradients."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern, functional
from dilated_attention_pytorch.distributed import ring_dilated_attention

from .spawn import init, spawn

pytestmark = pytest.mark.gpu

# (seq, segment_lengths, dilation_rates, heads): shard 512 on 2 GPUs; 1024 and 2048 span 2 ranks
CASES = [(1024, (256, 512, 1024, 2048), (1, 2, 4, 8), 8), (1024, (128, 1024), (1, 3), 4)]


@contextlib.contextmanager
def _nccl(rank: int, world: int, init_file: str) -> Iterator[None]:
    torch.cuda.set_device(rank)
    init(rank, world, init_file, "nccl")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _compare(run, q, k, v, grad, part: slice, label: str, report: list[str]) -> None:
    """``run(q, k, v, method)`` in fp32 on one GPU (the reference), in bf16 on one
    GPU and sharded in bf16 (``method=None``: the ring); outputs and input gradients
    of the ring must be within 2x the single-GPU error of the reference."""
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = run(*inputs, "reference")
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    single = run(*low, "single")
    single_grads = torch.autograd.grad(single, low, grad.bfloat16())
    shards = [x.bfloat16()[:, part].clone().requires_grad_() for x in (q, k, v)]
    out = run(*shards, None)
    ring_grads = torch.autograd.grad(out, shards, grad.bfloat16()[:, part])
    for name, r, s, e in zip(
        ("out", "dq", "dk", "dv"), (out, *ring_grads), (single, *single_grads), (ref, *ref_grads)
    ):
        ring_err = (r.float() - e[:, part]).abs().max().item()
        single_err = (s.float()[:, part] - e[:, part]).abs().max().item()
        if not ring_err <= 2 * single_err + 1e-6:
            report.append(f"{label} {name}: {ring_err} vs {single_err}")


def _inputs(seq: int, heads: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, seq, heads, 64, device="cuda", generator=g) for _ in range(4)]


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    with _nccl(rank, world, init_file):
        report: list[str] = []
        for (seq, seg, dil, heads), exchange in itertools.product(CASES, ("all_gather", "ring")):
            for head_mode in ("grouped", "all"):
                for causal in (False, True):
                    pattern = DilatedPattern(seg, dil, head_mode)

                    def run(q, k, v, which, pattern=pattern, causal=causal, exchange=exchange):
                        if which is None:
                            return ring_dilated_attention(
                                q, k, v, pattern, is_causal=causal, exchange=exchange
                            )
                        backend = "math" if which == "reference" else None
                        return functional.dilated_attention(
                            q, k, v, pattern, is_causal=causal, backend=backend
                        )

                    part = slice(rank * seq // world, (rank + 1) * seq // world)
                    label = f"{exchange} {seq} {seg} {head_mode} {causal}"
                    _compare(run, *_inputs(seq, heads, seq + len(seg)), part, label, report)
        results[rank] = report


# (seq, segment_lengths, dilation_rates, heads): block_size 128, shard 2048 on 2 GPUs
SPARSE_CASES = [(4096, (4096,), (1,), 4), (4096, (1024, 4096), (1, 2), 4)]


def _block_sparse_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch.sparse import layouts

    with _nccl(rank, world, init_file):
        report: list[str] = []
        for seq, seg, dil, heads in SPARSE_CASES:
            for head_mode in ("grouped", "all"):
                for causal in (False, True):
                    pattern = DilatedPattern(seg, dil, head_mode)
                    layout = layouts.make_layout(
                        "dilated_sparse", seq // 128, 0.8, causal=causal, device="cuda"
                    )

                    def run(q, k, v, which, pattern=pattern, causal=causal, layout=layout):
                        kw = {"is_causal": causal, "block_layout": layout, "block_size": 128}
                        if which is None:
                            return ring_dilated_attention(q, k, v, pattern, method="flex", **kw)
                        method = "gather" if which == "reference" else "flex"
                        return functional.dilated_attention(q, k, v, pattern, method=method, **kw)

                    part = slice(rank * seq // world, (rank + 1) * seq // world)
                    label = f"block-sparse {seq} {seg} {head_mode} {causal}"
                    _compare(run, *_inputs(seq, heads, seq + len(seg)), part, label, report)
        results[rank] = report


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_block_sparse_ring_nccl_bf16(tmp_path):
    results = spawn(_block_sparse_worker, 2, tmp_path)
    assert sorted(results) == [0, 1]
    assert all(not r for r in results.values()), dict(results)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ring_nccl_bf16(tmp_path):
    results = spawn(_worker, 2, tmp_path)
    assert sorted(results) == [0, 1]
    assert all(not r for r in results.values()), dict(results)


def _stack_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch import ImprovedMultiheadDilatedAttention, RingMultiheadDilatedAttention

    from .stack import loss_and_grad_norm, stack

    with _nccl(rank, world, init_file):
        kw = {"segment_lengths": [256, 512, 2048], "dilation_rates": [1, 2, 4], "device": "cuda"}
        x = torch.randn(2, 2048, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
        ref = loss_and_grad_norm(
            stack(ImprovedMultiheadDilatedAttention, dim=256, heads=8, **kw), x, x.numel()
        )
        single = loss_and_grad_norm(
            stack(ImprovedMultiheadDilatedAttention, dim=256, heads=8, **kw).bfloat16(),
            x.bfloat16(),
            x.numel(),
        )
        shard = x.shape[1] // world
        ring_model = stack(RingMultiheadDilatedAttention, dim=256, heads=8, **kw).bfloat16()
        x_local = x.bfloat16()[:, rank * shard : (rank + 1) * shard]
        ring = loss_and_grad_norm(ring_model, x_local, x.numel(), group=dist.group.WORLD)
        results[rank] = (ref, single, ring)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ring_nccl_eight_layer_stack(tmp_path):
    results = spawn(_stack_worker, 2, tmp_path)
    for ref, single, ring in results.values():
        for i, what in enumerate(("loss", "grad norm")):
            single_err = abs(single[i] - ref[i]) / abs(ref[i])
            ring_err = abs(ring[i] - ref[i]) / abs(ref[i])
            assert ring_err <= max(2 * single_err, 1e-2), (what, ref[i], single[i], ring[i])
