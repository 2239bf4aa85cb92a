"""One-process A/B of packed documents in "all" mode (the 1M-token long-tailed
mix of ``models.py --benches varlen``, 32/8 heads of 128, bf16): the fused
Triton merges and sums at row indices ("new") against fused merges only
("merge_only": ``index_add_`` of converted copies) and neither ("old": the torch
merges), with the unpacked sequence beside; alternating rounds, best of each.
Then a torch.profiler table of the causal "new" step.

    python benchmarks/probes/varlen_all_merge_ab.py --output ab.json --profile profile.txt
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timer, fwd_bwd, peak_mib
from models import DIL, SEG, long_tailed_lengths

from dilated_attention_pytorch import DilatedPattern, dilated_attention, dilated_attention_varlen
from dilated_attention_pytorch.core import merge_triton

FUSED_MERGE, FUSED_ADD = merge_triton.can_merge, merge_triton.can_add_at_rows
VARIANTS = ("new", "merge_only", "old")


def use(variant: str) -> None:
    merge_triton.can_merge = FUSED_MERGE if variant in ("new", "merge_only") else (lambda *a: False)
    merge_triton.can_add_at_rows = FUSED_ADD if variant == "new" else (lambda *a: False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path)
    p.add_argument("--profile", type=Path)
    args = p.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, warmup=2, repeats=5)
    lengths = long_tailed_lengths(1 << 20)
    n, h, kv_heads, d = sum(lengths), 32, 8, 128
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q = torch.randn(n, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(n, kv_heads, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn_like(q)
    pattern = DilatedPattern(SEG, DIL, "all")
    records = []
    for causal in (True, False):
        packed = fwd_bwd(
            lambda c=causal: dilated_attention_varlen(q, k, v, cu, max(lengths), pattern, is_causal=c),
            (q, k, v),
            grad,
        )
        unpacked = fwd_bwd(
            lambda c=causal: dilated_attention(q[None], k[None], v[None], pattern, is_causal=c)[0],
            (q, k, v),
            grad,
        )
        record: dict = {"causal": causal, "head_mode": "all", "total_tokens": n, "num_docs": len(lengths)}
        for _ in range(args.rounds):
            for name in (*VARIANTS, "unpacked"):
                use("new" if name == "unpacked" else name)
                record.setdefault(f"{name}_ms", []).append(timer(unpacked if name == "unpacked" else packed))
        use("new")
        for name in VARIANTS:
            record[f"{name}_over_unpacked"] = min(record[f"{name}_ms"]) / min(record["unpacked_ms"])
        record["peak_mib_new"] = peak_mib(device, packed, (q, k, v))
        print(json.dumps(record), flush=True)
        records.append(record)
        if causal and args.profile:
            packed()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                packed()
                torch.cuda.synchronize()
            args.profile.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    if args.output:
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}
        args.output.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
