"""The "all"-mode branch merge (``merge_triton.merge_branches``) at each tile and
warp count, with the branch layout read from memory or compiled in (``--static-meta``,
``static_meta=``): the forward's lse merge of every head and the backward's plain sum of
one head chunk, on the compact buffers of a workload's pattern, in GB/s moved
(compact rows and lse read, output and lse written), beside a plain copy of one
output's bytes. CUDA events, median of 20 after 5 warm-ups.

    python benchmarks/probes/merge_tiles.py --workloads W1 W2 --seq-len 1048576 --output tiles.json
    python benchmarks/probes/merge_tiles.py --elements 1024 2048 4096 --warps 1 2 4 8 --static-meta \
        --output tiles_static.json
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


def cases(workload: str, n: int, device: torch.device) -> list[dict]:
    w = WORKLOADS[workload]
    h, d = w["heads"], w["head_dim"]
    pattern = DilatedPattern(w["segment_lengths"], w["dilation_rates"], head_mode="all")
    rows = compact_rows(pattern, pattern.calls(n, h, diagonal=True), n, h)
    assert rows is not None
    dtype = torch.bfloat16
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


def time_case(
    case: dict, block_d: int, timer: Timer, elements: list[int], warps: list[int], static: list[bool]
) -> list[dict]:
    """The copy reference and every (tile, warps, static layout) of one case."""
    out, lse, parts, lses = case["out"], case["lse"], case["parts"], case["lses"]
    src = torch.empty_like(out).contiguous()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    found = [{"config": "copy", "ms": copy_ms, "gb_s": 2 * src.numel() * 2 / copy_ms / 1e6}]
    for size, num_warps, compiled in itertools.product(elements, warps, static):
        block_r = max(1, size // block_d)

        def launch(block_r: int = block_r, num_warps: int = num_warps, compiled: bool = compiled) -> None:
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
                num_warps=num_warps,
                static_meta=parts.meta if compiled else None,
            )

        ms = timer(launch)
        name = f"r{block_r}_w{num_warps}" + ("_static" if compiled else "")
        config = {"config": name, "block_r": block_r, "num_warps": num_warps, "static_meta": compiled}
        found.append({**config, "ms": ms, "gb_s": case["moved"] / ms / 1e6})
        print(found[-1], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"])
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--elements", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, to check the script")
    parser.add_argument("--static-meta", action="store_true", help="also with the layout compiled in")
    args = parser.parse_args()
    static = [False, True] if args.static_meta else [False]
    device = torch.device(args.device)
    timer = Timer(device, warmup=5, repeats=20)
    records = []
    for workload in args.workloads:
        block_d = merge_triton.tiles(WORKLOADS[workload]["head_dim"])[1]
        for case in cases(workload, args.seq_len, device):
            base = {
                "workload": workload,
                "seq_len": args.seq_len,
                "case": case["name"],
                "heads": case["heads"],
            }
            records += [
                {**base, **r} for r in time_case(case, block_d, timer, args.elements, args.warps, static)
            ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    info = {"device": name, "torch": torch.__version__}
    args.output.write_text(json.dumps({**info, "records": records}, indent=1))


if __name__ == "__main__":
    main()
