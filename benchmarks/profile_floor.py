"""Where the time goes at small n: wall time per backend and a torch.profiler
table (GPU kernels vs host time) for W1 at n = 32K.

    python benchmarks/profile_floor.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import DilatedPattern, functional

SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]


def wall_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    for head_mode in ("grouped", "all"):
        pattern = DilatedPattern(SEGMENTS, DILATIONS, head_mode)
        q, k, v = (
            torch.randn(1, 32768, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        for backend in (None, "sdpa_flash", "sdpa_cudnn"):

            def forward(backend=backend, pattern=pattern, q=q, k=k, v=v):
                return functional.dilated_attention(q, k, v, pattern, backend=backend)

            def step(forward=forward, grad=grad):
                forward().backward(grad)

            with torch.no_grad():
                fwd = wall_ms(forward)
            print(f"{head_mode} backend={backend}: fwd {fwd:.2f} ms, fwd+bwd {wall_ms(step):.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                functional.dilated_attention(q, k, v, pattern).backward(grad)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
