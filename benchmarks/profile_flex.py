"""Where the time of a block-sparse forward goes: the module call, the bare
compiled FlexAttention call on the same block mask, and the GPU kernel time
(torch.profiler). ``python benchmarks/profile_flex.py [--seq 65536]``"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Timer

from dilated_attention_pytorch import BlockSparseRingDilatedAttention
from dilated_attention_pytorch.functional import _problem_view
from dilated_attention_pytorch.kernels import flex as flex_kernel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="dilated_sparse")
    args = p.parse_args()
    n, h, d = args.seq, args.heads, args.head_dim
    module = BlockSparseRingDilatedAttention(
        [n], [1], pattern=args.pattern, sparsity=args.sparsity, backend="flex"
    )
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    timer = Timer(torch.device("cuda"), 3, 10)
    out = {"module_fwd_ms": timer(lambda: module(q, k, v))}
    call = module.pattern.calls(n, h)[0]
    layout4 = module.block_layout(n, False, q.device)[None, None]
    mask, _ = flex_kernel.block_mask(call, layout4, 128, False, 1)
    qp, kp, vp = (_problem_view(x, call) for x in (q, k, v))
    fn = flex_kernel._flex_attention("cuda")
    out["flex_strided_fwd_ms"] = timer(lambda: fn(qp, kp, vp, block_mask=mask))
    qc, kc, vc = (x.contiguous() for x in (qp, kp, vp))
    out["flex_contiguous_fwd_ms"] = timer(lambda: fn(qc, kc, vc, block_mask=mask))
    out["flex_attention_wrapper_ms"] = timer(lambda: flex_kernel.attention(qp, kp, vp, mask, None, d**-0.5))
    configs = [
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    ]
    for cfg in configs:
        name = "_".join(f"{k}{v}" for k, v in cfg.items())
        try:
            out[f"flex_{name}_fwd_ms"] = timer(
                lambda cfg=cfg: fn(qp, kp, vp, block_mask=mask, kernel_options=cfg)
            )
        except Exception as e:  # a config the template rejects
            out[f"flex_{name}_fwd_ms"] = repr(e)[:200]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            module(q, k, v)
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            kernels[e.key[:80]] = round(e.device_time_total / 5 / 1e3, 3)
    out["module_kernel_ms_per_call"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
