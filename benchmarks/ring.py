"""Sequence-parallel scaling: launch with torchrun, one process per GPU.

    torchrun --nproc_per_node 2 benchmarks/ring.py --seq-lens 262144 1048576 --output ring2.json
    torchrun --nproc_per_node 4 benchmarks/ring.py --exchange all_gather ring ulysses hybrid \
        --profile ring4_profile.json --output ring4.json
    torchrun --nproc_per_node 4 benchmarks/ring.py --module --find-max --output ring4_module.json

Each rank holds seq / world positions. Records per sequence length and
strategy (``--exchange``: ``all_gather``, ``ring``, ``ulysses``, or ``hybrid``:
heads over groups of ``--ulysses-size`` consecutive ranks, the sequence over
the rest with the ring exchange): fwd+bwd ms (slowest rank), tokens/s per GPU,
peak memory per GPU (largest rank). ``--module`` times the whole
``RingMultiheadDilatedAttention`` (projections included, embed = heads ·
head_dim) instead of the core. With --find-max, doubles seq from the last
length until a rank runs out of memory. ``--profile``: one more step of every
record under torch.profiler on every rank: the share of communication kernel
time that overlaps compute kernels, per rank, goes into the record; rank 0
writes its kernel tables to that file. ``--device cpu`` (gloo, wall-clock
time) is for testing the script. Exactness against one GPU:
benchmarks/sp_exactness.py.

With --block-sparse it runs ``BlockSparseRingDilatedAttention`` (FlexAttention;
``--sparsity``, ``--block-pattern``; default pattern one branch of the whole
sequence, as in benchmarks/block_sparse.py) sharded over the world, and also
records the key/value rows each GPU receives against what a dense exchange of
the same segments would send.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import (
    BlockSparseRingDilatedAttention,
    DilatedPattern,
    RingMultiheadDilatedAttention,
)
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.distributed.geometry import spans
from dilated_attention_pytorch.sparse.block_layout import prepare_layout

WORKLOADS = {
    "W1": (12, 64, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]),
    "W2": (16, 128, [2048, 4096, 8192, 16384, 32768, 65536], [1, 2, 4, 8, 16, 32]),
}


def received_rows(
    module: BlockSparseRingDilatedAttention, seq: int, heads: int, causal: bool
) -> tuple[int, int]:
    """Key/value rows this rank receives per head group, and what the segments'
    dense exchange (every selected row of the other members) would send."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = seq // world
    device = torch.device("cuda", torch.cuda.current_device())
    layout = prepare_layout(
        module.block_layout(seq, causal, device), module.block_size, (1, shard, heads, 1),
        torch.bfloat16, device, seq,
    )  # fmt: skip
    calls = [c for c in module.pattern.calls(seq, heads) if c.segment_length > shard]
    found = spans(calls, rank, None, shard, device, layout, causal)
    sparse = sum(int(i.numel()) for sp in found for j, i in enumerate(sp.keys.recv) if j != sp.keys.index)
    dense = 0
    for sp in found:
        members = sp.call.segment_length // shard
        dense += sum(len(range(0, shard, sp.call.dilation)) for _ in range(members - 1))
    return sparse, dense


def strategy(exchange: str, ulysses_size: int, device_type: str) -> dict[str, Any]:
    """Keyword arguments of ``ring_dilated_attention`` (and the ring module) for a
    strategy on the world: ``hybrid`` splits heads over groups of ``ulysses_size``
    consecutive ranks and the sequence over the ranks with the same index in
    them (rank ``r`` then holds shard ``r``, as with the other strategies)."""
    if exchange != "hybrid":
        return {"exchange": exchange}
    world = dist.get_world_size()
    if world % ulysses_size or ulysses_size < 1:
        raise ValueError(f"--ulysses-size must divide the world ({world}), got {ulysses_size}")
    mesh = init_device_mesh(
        device_type, (world // ulysses_size, ulysses_size), mesh_dim_names=("ring", "heads")
    )
    return {
        "exchange": "ulysses",
        "process_group": mesh.get_group("heads"),
        "ring_group": mesh.get_group("ring"),
        "ring_exchange": "ring",
    }


class Clock:
    """CUDA events on the GPU, wall-clock time on the CPU (testing only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def make_step(
    seq: int, args: argparse.Namespace, pattern: DilatedPattern, heads: int, head_dim: int, kwargs: dict
) -> tuple[Callable[[], None], dict]:
    """One forward+backward of this rank's shard, and extra record fields."""
    world = dist.get_world_size()
    shard = seq // world
    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    kv_heads = args.kv_heads or heads
    extra: dict = {}
    if args.module:
        embed = heads * head_dim
        module = RingMultiheadDilatedAttention(
            embed, heads, num_kv_heads=kv_heads, segment_lengths=pattern.segment_lengths,
            dilation_rates=pattern.dilation_rates, head_mode=pattern.head_mode, batch_first=True,
            device=device, dtype=dtype, **kwargs,
        )  # fmt: skip
        x = torch.randn(1, shard, embed, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)

        def module_step() -> None:
            x.grad = None
            module(x, x, x, is_causal=args.causal)[0].backward(grad)

        return module_step, extra
    attend = None
    if args.block_sparse:
        sparse = BlockSparseRingDilatedAttention(
            pattern.segment_lengths if args.segment_lengths else [seq],
            pattern.dilation_rates if args.segment_lengths else [1],
            head_mode=pattern.head_mode, block_size=args.block_size, pattern=args.block_pattern,
            sparsity=args.sparsity, process_group=dist.group.WORLD if world > 1 else None,
        )  # fmt: skip
        attend = sparse
        if world > 1:
            rows, dense_rows = received_rows(sparse, seq, heads, args.causal)
            extra = {"kv_rows_received": rows, "kv_rows_received_dense_exchange": dense_rows}
    q = torch.randn(1, shard, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(1, shard, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in "kv"
    )
    grad = torch.randn_like(q)

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        if attend is None:
            out = ring_dilated_attention(q, k, v, pattern, is_causal=args.causal, **kwargs)
        else:
            out = attend(q, k, v, is_causal=args.causal)
        out.backward(grad)

    return step, extra


def measure(
    seq: int, args: argparse.Namespace, pattern: DilatedPattern, heads: int, head_dim: int, exchange: str
) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = seq // world
    clock = Clock(torch.device(args.device))
    kwargs = {} if args.block_sparse else strategy(exchange, args.ulysses_size, args.device)
    clock.reset()
    ok = torch.ones(1, device=args.device)
    times: list[float] = []
    extra: dict = {}
    try:
        step, extra = make_step(seq, args, pattern, heads, head_dim, kwargs)
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            ms = clock.time_ms(step)
            if i >= args.warmup:
                times.append(ms)
        if args.profile is not None:
            extra["communication_overlap"] = profile_overlap(step, args, f"{exchange} {seq}")
        del step
    except torch.OutOfMemoryError:
        ok.zero_()
    except ValueError as error:  # a strategy this call cannot run (heads not divisible): every rank raises
        name = "block_sparse" if args.block_sparse else exchange
        return {"world": world, "seq_len": seq, "exchange": name, "module": args.module, "error": str(error)}
    # every rank learns whether all fitted, the slowest time and the largest peak
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    name = "block_sparse" if args.block_sparse else exchange
    if not ok.item():
        return {"world": world, "seq_len": seq, "exchange": name, "module": args.module, "fits": False}
    stats = torch.tensor([statistics.median(times), clock.peak_mib()], device=args.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    ms, peak = stats.tolist()
    return {
        "world": world,
        "seq_len": seq,
        "tokens_per_gpu": shard,
        "exchange": name,
        "module": args.module,
        "kv_heads": args.kv_heads or heads,
        "fits": True,
        "fwdbwd_ms": ms,
        "tokens_per_s_per_gpu": shard / (ms / 1e3),
        "peak_mem_mib_per_gpu": peak if args.device == "cuda" else None,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "rank": rank,
        **extra,
    }


def overlap_share(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float | None:
    """Share of the total length of ``comm`` intervals covered by the union of
    ``compute`` intervals (None without communication)."""
    total = sum(end - start for start, end in comm)
    if total <= 0:
        return None
    merged: list[list[float]] = []
    for start, end in sorted(compute):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    covered = 0.0
    for start, end in comm:
        for m_start, m_end in merged:
            covered += max(0.0, min(end, m_end) - max(start, m_start))
    return covered / total


def profile_overlap(step: Callable[[], None], args: argparse.Namespace, key: str) -> list[dict]:
    """One profiled step: per rank, the share of communication (NCCL) kernel time
    that overlaps compute kernels on the GPU timeline, gathered to every rank;
    rank 0 keeps its kernel table under ``key`` (written to ``args.profile``)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    dist.barrier()
    with profile(activities=activities) as prof:
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    comm, compute = [], []
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        interval = (float(event.time_range.start), float(event.time_range.end))
        (comm if "nccl" in event.name.lower() else compute).append(interval)
    share = overlap_share(comm, compute)
    mine = {
        "rank": dist.get_rank(),
        "comm_kernel_ms": sum(e - s for s, e in comm) / 1e3,
        "overlap_share": share,
    }
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        sort_by = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        args.profile_tables[key] = {"ranks": every, "rank0_table": prof.key_averages().table(sort_by=sort_by)}
    return every


def add_shape_arguments(p: argparse.ArgumentParser, default_exchange: list[str]) -> None:
    """The options this script shares with benchmarks/sp_exactness.py."""
    p.add_argument("--heads", type=int, help="overrides the workload's")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: the heads)")
    p.add_argument("--head-dim", type=int, help="overrides the workload's")
    p.add_argument("--segment-lengths", type=int, nargs="+", help="overrides the workload's")
    p.add_argument("--dilation-rates", type=int, nargs="+", help="overrides the workload's")
    p.add_argument(
        "--exchange",
        nargs="+",
        choices=["all_gather", "ring", "ulysses", "hybrid"],
        default=default_exchange,
        help="the sequence-parallel strategy (each one in turn)",
    )
    p.add_argument("--ulysses-size", type=int, default=2, help="ranks per head group of --exchange hybrid")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for testing")


def shape_of(args: argparse.Namespace) -> tuple[int, int, list[int], list[int]]:
    """``(heads, head_dim, segment_lengths, dilation_rates)``: the workload's, with the overrides."""
    heads, head_dim, seg, dil = WORKLOADS[args.workload]
    return (
        args.heads or heads,
        args.head_dim or head_dim,
        args.segment_lengths or seg,
        args.dilation_rates or dil,
    )


def init_distributed(device: str) -> None:
    """NCCL on this rank's GPU (torchrun's LOCAL_RANK), or gloo on the CPU."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    p.add_argument("--head-mode", choices=["grouped", "all"], default="grouped")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--find-max", action="store_true")
    p.add_argument(
        "--block-sparse", action="store_true", help="BlockSparseRingDilatedAttention (FlexAttention)"
    )
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block-pattern", default="dilated_sparse")
    p.add_argument("--block-size", type=int, default=128)
    add_shape_arguments(p, default_exchange=["all_gather"])
    p.add_argument("--module", action="store_true", help="the whole RingMultiheadDilatedAttention")
    p.add_argument("--profile", type=Path, help="write the communication overlap of one profiled step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    if args.find_max and args.device != "cuda":
        p.error("--find-max needs --device cuda (it stops at the first out-of-memory error)")
    args.profile_tables = {}
    init_distributed(args.device)
    heads, head_dim, seg, dil = shape_of(args)
    pattern = DilatedPattern(seg, dil, args.head_mode)
    records = [measure(n, args, pattern, heads, head_dim, x) for n in args.seq_lens for x in args.exchange]
    if args.find_max:
        for x in args.exchange:
            n, fits = args.seq_lens[-1], True
            while fits:
                n *= 2
                records.append(measure(n, args, pattern, heads, head_dim, x))
                fits = records[-1].get("fits", False)
    if dist.get_rank() == 0:
        for r in records:
            print(json.dumps(r), flush=True)
        if args.output:
            meta = {"workload": args.workload, "head_mode": args.head_mode, "causal": args.causal,
                    "heads": heads, "head_dim": head_dim, "torch": torch.__version__,
                    "ulysses_size": args.ulysses_size}  # fmt: skip
            if args.block_sparse:
                meta |= {"block_sparse": True, "sparsity": args.sparsity, "block_pattern": args.block_pattern,
                         "block_size": args.block_size,
                         "segment_lengths": args.segment_lengths or "[seq]",
                         "dilation_rates": args.dilation_rates or [1]}  # fmt: skip
            args.output.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        if args.profile:
            args.profile.write_text(json.dumps(args.profile_tables, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
