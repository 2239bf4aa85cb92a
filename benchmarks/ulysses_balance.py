"""Causal load balance of the sequence-parallel strategies, per rank, on CPU
gloo ranks: forward+backward wall time and process CPU time of each rank
(medians of repeats after a warm-up; the CPU time leaves out the waits in
collectives, where the wall time of a lighter rank includes waiting for the
heavier one), for sequence shards (``all_gather``) and head shards
(``ulysses``), with segments that span the ranks.

    python benchmarks/ulysses_balance.py --world 2 --output benchmarks/results/cpu_ulysses_balance.json

With causal attention the first sequence shard has the fewest keys per query;
under head parallelism every rank holds every position, so each does the same
work. Wall times on a shared CPU are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention


def _rank(rank: int, world: int, init_file: str, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pattern = DilatedPattern(args.segment_lengths, args.dilation_rates, args.head_mode)
        shard = args.seq_len // world
        g = torch.Generator().manual_seed(rank)
        q, k, v, grad = (torch.randn(1, shard, args.heads, 64, generator=g) for _ in range(4))
        times: dict[str, float] = {}
        for exchange in ("all_gather", "ulysses"):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]

            def step(exchange: str = exchange, leaves: list = leaves) -> None:
                out = ring_dilated_attention(*leaves, pattern, is_causal=True, exchange=exchange)
                out.backward(grad)

            step()
            wall, cpu = [], []
            for _ in range(args.repeats):
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            times[exchange] = statistics.median(wall) * 1e3
            times[f"{exchange}_cpu"] = statistics.median(cpu) * 1e3
        results[rank] = times
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 4])
    p.add_argument("--head-mode", default="all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank, args=(args.world, f"{tmp}/init", args, results), nprocs=args.world, start_method="spawn"
        )
    per_rank = [results[r] for r in range(args.world)]
    record = {
        "bench": "ulysses_balance", "device": "cpu", "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "world": args.world, "seq_len": args.seq_len, "heads": args.heads, "head_dim": 64,
        "segment_lengths": args.segment_lengths, "dilation_rates": args.dilation_rates,
        "head_mode": args.head_mode, "causal": True, "fwd_bwd_ms_per_rank": per_rank,
        # CPU time of each rank's process: its own work, without the waits in collectives
        "cpu_max_over_min": {
            ex: max(t[f"{ex}_cpu"] for t in per_rank) / min(t[f"{ex}_cpu"] for t in per_rank)
            for ex in ("all_gather", "ulysses")
        },
    }  # fmt: skip
    print(json.dumps(record, indent=1))
    if args.output:
        args.output.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
