"""Where the time of packed documents goes: a torch.profiler table (GPU kernels
and host time) of one forward+backward of the long-tailed mix of
``models.py --benches varlen`` on the varlen path, beside the same tokens
unpacked.

    python benchmarks/profile_varlen.py [--head-mode grouped] [--causal]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import DIL, SEG, long_tailed_lengths

from dilated_attention_pytorch import DilatedPattern, dilated_attention, dilated_attention_varlen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1 << 20)
    p.add_argument("--head-mode", default="grouped")
    p.add_argument("--causal", action="store_true")
    args = p.parse_args()
    lengths = long_tailed_lengths(args.seq_len)
    n, h, kv_heads, d = sum(lengths), 32, 8, 128
    pattern = DilatedPattern(SEG, DIL, args.head_mode)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(n, kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn_like(q)
    steps = {
        "packed": lambda: dilated_attention_varlen(q, k, v, cu, max(lengths), pattern, is_causal=args.causal),
        "unpacked": lambda: dilated_attention(q[None], k[None], v[None], pattern, is_causal=args.causal)[0],
    }
    for name, forward in steps.items():
        for _ in range(3):
            forward().backward(grad)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward().backward(grad)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
        print(f"== {name} ({args.head_mode}, causal={args.causal}): wall {wall:.1f} ms under the profiler")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
