"""Sequence-parallel scaling: launch with torchrun, one process per GPU.

    torchrun --nproc_per_node 2 benchmarks/ring.py --seq-lens 262144 1048576 --output ring2.json

Each rank holds seq / world positions. Records per sequence length: fwd+bwd ms
(slowest rank), tokens/s per GPU, peak memory per GPU (largest rank). With
--find-max, doubles seq from the last length until a rank runs out of memory.

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
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import BlockSparseRingDilatedAttention, DilatedPattern
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


def measure(
    seq: int, args: argparse.Namespace, pattern: DilatedPattern, heads: int, head_dim: int, exchange: str
) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = seq // world
    attend = None
    extra: dict = {}
    if args.block_sparse:
        module = BlockSparseRingDilatedAttention(
            pattern.segment_lengths if args.segment_lengths else [seq],
            pattern.dilation_rates if args.segment_lengths else [1],
            head_mode=pattern.head_mode, block_size=args.block_size, pattern=args.block_pattern,
            sparsity=args.sparsity, process_group=dist.group.WORLD if world > 1 else None,
        )  # fmt: skip
        attend = module
        if world > 1:
            rows, dense_rows = received_rows(module, seq, heads, args.causal)
            extra = {"kv_rows_received": rows, "kv_rows_received_dense_exchange": dense_rows}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ok = torch.ones(1, device="cuda")
    times: list[float] = []
    try:
        q, k, v = (
            torch.randn(1, shard, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        for i in range(args.warmup + args.repeats):
            for x in (q, k, v):
                x.grad = None
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if attend is None:
                out = ring_dilated_attention(q, k, v, pattern, is_causal=args.causal, exchange=exchange)
            else:
                out = attend(q, k, v, is_causal=args.causal)
            out.backward(grad)
            end.record()
            end.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(end))
        del q, k, v, grad
    except torch.OutOfMemoryError:
        ok.zero_()
    # every rank learns whether all fitted, the slowest time and the largest peak
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        return {"world": world, "seq_len": seq, "exchange": exchange, "fits": False}
    stats = torch.tensor([statistics.median(times), torch.cuda.max_memory_allocated() / 2**20], device="cuda")
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    ms, peak = stats.tolist()
    return {
        "world": world,
        "seq_len": seq,
        "tokens_per_gpu": shard,
        "exchange": None if args.block_sparse else exchange,
        "fits": True,
        "fwdbwd_ms": ms,
        "tokens_per_s_per_gpu": shard / (ms / 1e3),
        "peak_mem_mib_per_gpu": peak,
        "device": torch.cuda.get_device_name(),
        "rank": rank,
        **extra,
    }


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
    p.add_argument("--heads", type=int, help="overrides the workload's")
    p.add_argument("--head-dim", type=int, help="overrides the workload's")
    p.add_argument("--segment-lengths", type=int, nargs="+", help="overrides the workload's")
    p.add_argument("--dilation-rates", type=int, nargs="+", help="overrides the workload's")
    p.add_argument(
        "--exchange",
        nargs="+",
        choices=["all_gather", "ring"],
        default=["all_gather"],
        help="how spanning segments bring keys together (each one measured in turn)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    heads, head_dim, seg, dil = WORKLOADS[args.workload]
    heads, head_dim = args.heads or heads, args.head_dim or head_dim
    seg, dil = args.segment_lengths or seg, args.dilation_rates or dil
    pattern = DilatedPattern(seg, dil, args.head_mode)
    records = [measure(n, args, pattern, heads, head_dim, x) for n in args.seq_lens for x in args.exchange]
    if args.find_max:
        for x in args.exchange:
            n, fits = args.seq_lens[-1], True
            while fits:
                n *= 2
                records.append(measure(n, args, pattern, heads, head_dim, x))
                fits = records[-1]["fits"]
    if dist.get_rank() == 0:
        for r in records:
            print(json.dumps(r), flush=True)
        if args.output:
            meta = {"workload": args.workload, "head_mode": args.head_mode, "causal": args.causal,
                    "heads": heads, "head_dim": head_dim, "torch": torch.__version__}  # fmt: skip
            if args.block_sparse:
                meta |= {"block_sparse": True, "sparsity": args.sparsity, "block_pattern": args.block_pattern,
                         "block_size": args.block_size,
                         "segment_lengths": args.segment_lengths or "[seq]",
                         "dilation_rates": args.dilation_rates or [1]}  # fmt: skip
            args.output.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
