"""Largest sequence the multihead module trains on (forward+backward) on one GPU:
doubling from ``--start`` until one does not fit, then bisecting between the last
that fit and the first that did not, in steps of ``--step`` tokens.

python benchmarks/max_seq.py --embed-dim 768 --heads 12 --start 1048576 --step 262144
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import create_multihead_dilated_attention


def fits(seq: int, args: argparse.Namespace) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = create_multihead_dilated_attention(
        args.attention_type,
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        batch_first=True,
        device="cuda",
        dtype=torch.bfloat16,
    )
    try:
        x = torch.randn(1, seq, args.embed_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = m(x, x, x, is_causal=True)[0]
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        return {"seq_len": seq, "fits": True, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    except torch.OutOfMemoryError:
        return {"seq_len": seq, "fits": False}
    finally:
        del m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attention-type", default="auto")
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--start", type=int, default=1 << 20)
    p.add_argument("--step", type=int, default=0, help="bisection granularity (0: doubling only)")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    results, seq = [], args.start

    def trial(seq: int) -> bool:
        r = fits(seq, args)
        results.append(r)
        print(r, flush=True)
        return bool(r["fits"])

    while trial(seq):
        seq *= 2
    low, high = seq // 2, seq  # low fit (unless it is below --start), high did not
    while args.step and high - low > args.step:
        middle = (low + high) // 2 // args.step * args.step
        if middle <= low:
            break
        low, high = (middle, high) if trial(middle) else (low, middle)
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "largest_fit": max((r["seq_len"] for r in results if r["fits"]), default=None),
                    "runs": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
