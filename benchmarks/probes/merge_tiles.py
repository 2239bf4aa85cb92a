"""The "all"-mode branch merge (``merge_triton.merge_branches``) at each tile and
warp count: the forward's lse merge of every head and the backward's plain sum of
one head chunk, on the compact buffers of a workload's pattern, in GB/s moved
(compact rows and lse read, output and lse written), beside a plain copy of one
output's bytes. CUDA events, median of 20 after 5 warm-ups.

    python benchmarks/probes/merge_tiles.py --workloads W1 W2 --seq-len 1048576 --output tiles.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import WORKLOADS, Timer

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.core import merge_triton
from dilated_attention_pytorch.core.fused import merge_head_chunk
from dilated_attention_pytorch.core.merge import BranchBuffers, _branch_meta
from dilated_attention_pytorch.pattern import compact_rows


def cases(workload: str, n: int) -> list[dict]:
    w = WORKLOADS[workload]
    h, d = w["heads"], w["head_dim"]
    pattern = DilatedPattern(w["segment_lengths"], w["dilation_rates"], head_mode="all")
    rows = compact_rows(pattern, pattern.calls(n, h, diagonal=True), n, h)
    assert rows is not None
    device, dtype = torch.device("cuda"), torch.bfloat16
    per_position = sum(r.num_rows for r in rows.values()) / n
    chunk = merge_head_chunk(h, per_position, n * h * d * 2)
    found = []
    for name, heads, weighted in (("forward", h, True), ("backward_chunk", chunk, False)):
        parts = BranchBuffers(rows, 1, heads, d, dtype, device)
        parts.flat.normal_()
        lses = BranchBuffers(rows, 1, heads, None, torch.float32, device) if weighted else None
        if lses is not None:
            lses.flat.normal_()
        full = torch.empty(1, n, h, d, device=device, dtype=dtype)
        out = full[:, :, :heads]
        lse = torch.empty(1, n, heads, device=device, dtype=torch.float32) if weighted else None
        moved = parts.flat.numel() * 2 + out.numel() * 2
        if lses is not None:
            moved += lses.flat.numel() * 4 + n * heads * 4
        meta, offsets = _branch_meta(parts, device)
        found.append(dict(name=name, heads=heads, parts=parts, lses=lses, out=out, lse=lse,
                          moved=moved, meta=meta, offsets=offsets))  # fmt: skip
    return found


def time_case(case: dict, block_d: int, timer: Timer) -> list[dict]:
    """The copy reference and every (tile, warps) of one case."""
    out, lse, parts, lses = case["out"], case["lse"], case["parts"], case["lses"]
    src = torch.empty_like(out).contiguous()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    found = [{"config": "copy", "ms": copy_ms, "gb_s": 2 * src.numel() * 2 / copy_ms / 1e6}]
    for elements, warps in itertools.product((1024, 2048, 4096, 8192, 16384), (1, 2, 4, 8, 16)):
        block_r = max(1, elements // block_d)

        def launch(block_r: int = block_r, warps: int = warps) -> None:
            part_lse = None if lses is None else lses.flat
            merge_triton.merge_branches(
                out,
                lse,
                parts.flat,
                part_lse,
                case["meta"],
                case["offsets"],
                0,
                block_r=block_r,
                num_warps=warps,
            )

        ms = timer(launch)
        config = {"config": f"r{block_r}_w{warps}", "block_r": block_r, "num_warps": warps}
        found.append({**config, "ms": ms, "gb_s": case["moved"] / ms / 1e6})
        print(found[-1], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"])
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    timer = Timer(torch.device("cuda"), warmup=5, repeats=20)
    records = []
    for workload in args.workloads:
        block_d = merge_triton.tiles(WORKLOADS[workload]["head_dim"])[1]
        for case in cases(workload, args.seq_len):
            base = {
                "workload": workload,
                "seq_len": args.seq_len,
                "case": case["name"],
                "heads": case["heads"],
            }
            records += [{**base, **r} for r in time_case(case, block_d, timer)]
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.output.write_text(json.dumps({**info, "records": records}, indent=1))


if __name__ == "__main__":
    main()
