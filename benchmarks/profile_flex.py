"""Where the time of a block-sparse forward and backward goes, against dense
cuDNN in the same process: the module, the bare compiled FlexAttention call on
the same block mask with kernel options (and ``BACKEND="FLASH"`` where
flash-attn-4 is installed), the block-mask build step by step, and the GPU
kernel time of the module (torch.profiler).

    python benchmarks/profile_flex.py [--seq 65536] [--warm-seq 32768]
        [--variants default divisible static safe tma flash] [--output F.json]

``--warm-seq`` runs the module once at another length first, as a sweep does:
the compiled FlexAttention then serves the measured length with dynamic shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import Timer, fwd_bwd
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attention_pytorch import BlockSparseRingDilatedAttention
from dilated_attention_pytorch.core.views import problem_view
from dilated_attention_pytorch.sparse import block_mask as flex_kernel
from dilated_attention_pytorch.sparse import flex
from dilated_attention_pytorch.sparse.block_layout import prepare_layout

#: FlexAttention kernel options tried on the bare call
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # lengths known to be multiples of 128 (set by the library; dynamic shapes cannot prove it)
    "divisible": {"IS_DIVISIBLE": True},
    "safe": {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "tma": {"USE_TMA": True},
    "flash": {"BACKEND": "FLASH"},
}
#: the bare call compiled for static shapes (``dynamic=False``), default options
STATIC = "static"


def _kernels(fn: Callable[[], Any], calls: int = 5) -> dict[str, Any]:
    """GPU kernel milliseconds per call (top 10) and host milliseconds per call."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / calls
        torch.cuda.synchronize()
    kernels = {
        e.key[:80]: round(e.device_time_total / calls / 1e3, 4)
        for e in prof.key_averages()
        if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
    }
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:10])
    return {"host_ms_per_call": host, "gpu_ms_per_call": sum(kernels.values()), "kernels": top}


def _build_steps(call: Any, layout4: torch.Tensor, block_size: int, timer: Timer) -> dict[str, float]:
    """Milliseconds of each step of :func:`flex_kernel.block_mask` (synchronised)."""
    need, full = flex_kernel.tile_masks(call, layout4, block_size, False, False)
    steps = {
        "tile_masks": lambda: flex_kernel.tile_masks(call, layout4, block_size, False, False),
        "kv_blocks_x2": lambda: flex_kernel._to_kv_blocks(need & ~full, full),
        "from_tiles": lambda: flex_kernel._from_tiles(
            need, full, flex_kernel.flex_module.noop_mask, (call.length,) * 2
        ),
        "block_mask": lambda: flex_kernel.block_mask(call, layout4, block_size, False, 1),
    }
    return {name: timer(fn) for name, fn in steps.items()}


def _dense(n: int, h: int, d: int, timer: Timer) -> dict[str, float]:
    """Dense cuDNN SDPA on the same sequence: the ceiling."""
    q, k, v = (
        torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

        return {"fwd_ms": timer(dense), "fwdbwd_ms": timer(fwd_bwd(dense, (q, k, v), grad))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="dilated_sparse")
    p.add_argument("--warm-seq", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, STATIC])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    n, h, d = args.seq, args.heads, args.head_dim
    torch._dynamo.config.recompile_limit = 64
    dev = torch.empty(0, device="cuda").device  # with its index
    timer = Timer(dev, 3, args.repeats)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": n}

    res["dense_cudnn"] = _dense(n, h, d, timer)
    print(json.dumps(res), flush=True)

    module = BlockSparseRingDilatedAttention(
        [n], [1], pattern=args.pattern, sparsity=args.sparsity, backend="flex"
    )
    if args.warm_seq:
        warm = BlockSparseRingDilatedAttention(
            [args.warm_seq], [1], pattern=args.pattern, sparsity=args.sparsity, backend="flex"
        )
        x = torch.randn(1, args.warm_seq, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        warm(x, x, x).sum().backward()
        res["warm_seq"] = args.warm_seq
    q, k, v = (torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn_like(q)

    def mod() -> torch.Tensor:
        return module(q, k, v)

    res["module"] = {"fwd_ms": timer(mod), "fwdbwd_ms": timer(fwd_bwd(mod, (q, k, v), grad))}
    res["module"]["fwd_profile"] = _kernels(mod)
    print(json.dumps(res["module"]), flush=True)

    call = module.pattern.calls(n, h)[0]
    layout = module.block_layout(n, False, dev)
    layout4 = prepare_layout(layout, module.block_size, (1, n, h, d), torch.bfloat16, dev).blocks
    mask, _ = flex_kernel.block_mask(call, layout4, module.block_size, False, 1)
    res["build_ms"] = _build_steps(call, layout4, module.block_size, timer)
    res["build_profile"] = _kernels(
        lambda: flex_kernel.block_mask(call, layout4, module.block_size, False, 1)
    )
    print(json.dumps(res["build_ms"]), flush=True)

    qp, kp, vp = (problem_view(x, call) for x in (q, k, v))
    gp = torch.randn_like(qp)
    dynamic = flex._flex_attention("cuda")
    static = torch.compile(flex_kernel.flex_module.flex_attention, dynamic=False)
    reference = None
    for name in args.variants:
        opts = VARIANTS.get(name, {})
        fn = static if name == STATIC else dynamic

        def bare(opts: dict[str, Any] = opts, fn: Callable[..., Any] = fn) -> torch.Tensor:
            return fn(qp, kp, vp, block_mask=mask, kernel_options=opts)

        try:
            t0 = time.perf_counter()
            out = bare()
            torch.cuda.synchronize()
            rec: dict[str, Any] = {"first_call_s": time.perf_counter() - t0}
            if reference is None:
                reference = out.detach().float()
            rec["max_abs_diff_vs_default"] = (out.detach().float() - reference).abs().max().item()
            rec["fwd_ms"] = timer(bare)
            rec["fwdbwd_ms"] = timer(fwd_bwd(bare, (q, k, v), gp))
        except Exception as e:  # an option this torch/GPU rejects
            rec = {"error": repr(e)[:400]}
        res[f"flex_{name}"] = rec
        print(name, json.dumps(rec), flush=True)

    dense_fwd = res["dense_cudnn"]["fwd_ms"]
    res["speedup_fwd"] = {
        key: dense_fwd / val["fwd_ms"]
        for key, val in res.items()
        if isinstance(val, dict) and "fwd_ms" in val
    }
    print(json.dumps(res, indent=1))
    if args.output:
        args.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
