"""Where the GPU time of one step goes: torch.profiler kernel time by kind
(attention kernels, copies, fills, the Triton merge, the rest) for the fused
path's forward and forward+backward, beside the same kernels on the dense
sub-problems of the benchmark's ceiling (``run.py``), plus the eager wall time
and kernel count. The difference of the attention rows is what strided views
cost the kernels; the copies and fills are what writing results into place costs.

    python benchmarks/profile_step.py --workload W1 --seq-lens 1048576 --output prof.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import WORKLOADS, Timer, fwd_bwd
from run import DENSE_BACKENDS, _dense_problem_fns
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from dilated_attention_pytorch import DilatedPattern, functional

#: kernel name fragments, first match wins
KINDS = (
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("merge", ("_merge_kernel", "_branches_kernel", "_add_rows_kernel")),
    ("place", ("_place_kernel",)),
    ("copy", ("copy", "memcpy")),
    ("fill", ("fill",)),
)


def kind_of(kernel: str) -> str:
    lower = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p.lower() in lower for p in parts)), "other")


def kernel_profile(fn: Callable[[], Any], steps: int = 3) -> dict[str, Any]:
    """GPU ms per step by kind, kernels per step and the heaviest kernels of ``fn``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    count = 0
    for event in prof.events():
        # device-to-device memcpys are copies too (a contiguous copy_ is one)
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.device_time / 1e3 / steps
        by_kind[kind_of(event.name)] = by_kind.get(kind_of(event.name), 0.0) + ms
        by_name[event.name[:90]] = by_name.get(event.name[:90], 0.0) + ms
        count += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "gpu_ms": sum(by_kind.values()),
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "kernels_per_step": count / steps,
        "top_kernels_ms": dict(top),
    }


def dense_steps(
    pattern: DilatedPattern, w: dict[str, Any], n: int, causal: bool, backend: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) of every dense sub-problem the fused path runs, contiguous."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    fns = [
        _dense_problem_fns(
            backend, (c.num_segments, c.num_heads, c.length), w["head_dim"], causal, device, dtype
        )
        for c in pattern.calls(n, w["heads"], diagonal=True)
        if c.length > 1
    ]

    def forward() -> None:
        for f, _ in fns:
            f()

    def step() -> None:
        for _, s in fns:
            s()

    return forward, step


def fused_records(workload: str, n: int, head_mode: str, causal: bool, timer: Timer) -> dict[str, Any]:
    w = WORKLOADS[workload]
    pattern = DilatedPattern(w["segment_lengths"], w["dilation_rates"], head_mode)
    q, k, v = (
        torch.randn(1, n, w["heads"], w["head_dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    grad = torch.randn_like(q)

    def forward() -> torch.Tensor:
        return functional.dilated_attention(q, k, v, pattern, is_causal=causal)

    step = fwd_bwd(forward, (q, k, v), grad)
    with torch.no_grad():
        fwd = {"wall_ms": timer(forward), **kernel_profile(forward)}
    return {"fused_fwd": fwd, "fused_fwdbwd": {"wall_ms": timer(step), **kernel_profile(step)}}


def record(workload: str, n: int, head_mode: str, causal: bool, dense: str) -> dict[str, Any]:
    w = WORKLOADS[workload]
    pattern = DilatedPattern(w["segment_lengths"], w["dilation_rates"], head_mode)
    timer = Timer(torch.device("cuda"), warmup=3, repeats=5)
    rec: dict[str, Any] = {"workload": workload, "seq_len": n, "head_mode": head_mode, "causal": causal}
    rec.update(fused_records(workload, n, head_mode, causal, timer))
    dense_fwd, dense_step = dense_steps(pattern, w, n, causal, dense)
    with sdpa_kernel(DENSE_BACKENDS[dense]) if dense in DENSE_BACKENDS else contextlib.nullcontext():
        rec["dense_fwd"] = {"wall_ms": timer(dense_fwd), **kernel_profile(dense_fwd)}
        rec["dense_fwdbwd"] = {"wall_ms": timer(dense_step), **kernel_profile(dense_step)}
    rec["dense_backend"] = dense
    return rec


def summary(rec: dict[str, Any]) -> str:
    cells = []
    for part in ("fwd", "fwdbwd"):
        fused, dense = rec[f"fused_{part}"], rec[f"dense_{part}"]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in fused["by_kind_ms"].items())
        cells.append(
            f"{part}: wall {fused['wall_ms']:.2f} vs dense {dense['wall_ms']:.2f} ms; "
            f"GPU {fused['gpu_ms']:.2f} "
            f"({kinds}; {fused['kernels_per_step']:.0f} kernels) vs dense attention "
            f"{dense['by_kind_ms'].get('attention', 0.0):.2f} of {dense['gpu_ms']:.2f}"
        )
    head = f"{rec['workload']} n={rec['seq_len']} {rec['head_mode']} causal={rec['causal']}"
    return head + "\n  " + "\n  ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    p.add_argument("--head-modes", nargs="+", default=["grouped", "all"])
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument(
        "--dense", default="cudnn", help="the ceiling's kernel: a run.py dense backend or registry name"
    )
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    rows = []
    for n in args.seq_lens:
        for head_mode in args.head_modes:
            for causal in args.causal:
                rows.append(record(args.workload, n, head_mode, causal == "true", args.dense))
                print(summary(rows[-1]), flush=True)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
