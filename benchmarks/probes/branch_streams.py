"""W1's grouped branch problems (cuDNN, contiguous, bf16) one after another on
one stream against one stream per branch, eager (no CUDA graph): forward and
forward+backward, two alternating rounds, CUDA events, median of 30 after 5 warm-ups.

    python benchmarks/probes/branch_streams.py --output branch_streams.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timer

from dilated_attention_pytorch.kernels.sdpa import CudnnBackend

SEG, DIL, HEADS, HEAD_DIM, SCALE = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12], 12, 64, 0.125


def record(n: int, causal: bool) -> dict:
    backend = CudnnBackend()
    heads = [HEADS // 5 + (1 if i < HEADS % 5 else 0) for i in range(5)]
    problems = []
    for w, r, h in zip(SEG, DIL, heads):
        w = min(w, n)
        shape = (n // w, h, -(-w // r), HEAD_DIM)
        problems.append(tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in "qkv"))
    flops = (0.5 if causal else 1.0) * sum(
        4 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * HEAD_DIM for q, _, _ in problems
    )
    saved = [backend.forward(q, k, v, None, causal, SCALE) for q, k, v in problems]
    grads = [torch.randn_like(out) for out, _, _ in saved]
    streams = [torch.cuda.Stream() for _ in problems]

    def one(i: int, backward: bool) -> None:
        q, k, v = problems[i]
        backend.forward(q, k, v, None, causal, SCALE)
        if backward:
            out, lse, state = saved[i]
            backend.backward(grads[i], q, k, v, out, lse, None, causal, SCALE, state)

    def in_order(backward: bool) -> None:
        for i in range(len(problems)):
            one(i, backward)

    def concurrent(backward: bool) -> None:
        current = torch.cuda.current_stream()
        for i, stream in enumerate(streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                one(i, backward)
        for stream in streams:
            current.wait_stream(stream)

    timer = Timer(torch.device("cuda"), warmup=5, repeats=30)
    result: dict = {"n": n, "causal": causal}
    for _ in range(2):
        for name, fn, backward, f in [
            ("fwd_seq", in_order, False, flops), ("fwd_streams", concurrent, False, flops),
            ("fb_seq", in_order, True, 3.5 * flops), ("fb_streams", concurrent, True, 3.5 * flops),
        ]:  # fmt: skip
            ms = timer(functools.partial(fn, backward))
            result.setdefault(f"{name}_ms", []).append(ms)
            result.setdefault(f"{name}_tflops", []).append(f / ms / 1e9)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    rows = []
    for n in args.seq_lens:
        for causal in (False, True):
            rows.append(record(n, causal))
            print(json.dumps(rows[-1]), flush=True)
    if args.output:
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        args.output.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
