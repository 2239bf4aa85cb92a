"""Sequence-parallel scaling: launch with torchrun, one process per GPU.

    torchrun --nproc_per_node 2 benchmarks/ring.py --seq-lens 262144 1048576 --output ring2.json

Each rank holds seq / world positions. Records per sequence length: fwd+bwd ms
(slowest rank), tokens/s per GPU, peak memory per GPU (largest rank). With
--find-max, doubles seq from the last length until a rank runs out of memory.
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

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention

WORKLOADS = {
    "W1": (12, 64, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]),
    "W2": (16, 128, [2048, 4096, 8192, 16384, 32768, 65536], [1, 2, 4, 8, 16, 32]),
}


def measure(seq: int, args: argparse.Namespace, pattern: DilatedPattern, heads: int, head_dim: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = seq // world
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
            ring_dilated_attention(q, k, v, pattern, is_causal=args.causal).backward(grad)
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
        return {"world": world, "seq_len": seq, "fits": False}
    stats = torch.tensor([statistics.median(times), torch.cuda.max_memory_allocated() / 2**20], device="cuda")
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    ms, peak = stats.tolist()
    return {
        "world": world,
        "seq_len": seq,
        "tokens_per_gpu": shard,
        "fits": True,
        "fwdbwd_ms": ms,
        "tokens_per_s_per_gpu": shard / (ms / 1e3),
        "peak_mem_mib_per_gpu": peak,
        "device": torch.cuda.get_device_name(),
        "rank": rank,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    p.add_argument("--head-mode", choices=["grouped", "all"], default="grouped")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--find-max", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    heads, head_dim, seg, dil = WORKLOADS[args.workload]
    pattern = DilatedPattern(seg, dil, args.head_mode)
    records = [measure(n, args, pattern, heads, head_dim) for n in args.seq_lens]
    if args.find_max:
        n = args.seq_lens[-1]
        while records[-1]["fits"]:
            n *= 2
            records.append(measure(n, args, pattern, heads, head_dim))
    if dist.get_rank() == 0:
        for r in records:
            print(json.dumps(r), flush=True)
        if args.output:
            meta = {"workload": args.workload, "head_mode": args.head_mode, "causal": args.causal,
                    "torch": torch.__version__}  # fmt: skip
            args.output.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
