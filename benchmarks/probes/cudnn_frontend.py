"""The ``cudnn_frontend`` backend (cuDNN's graph API) on the GPU: its forward and
backward, fresh and into strided destinations, against the math backend in
float64 on strided branch-problem views (dilation, a head slice, shared
key/value heads, a value head_dim of its own, causal or not); then the host
time of one small call against SDPA's cuDNN op, and the build time of a graph.

    python benchmarks/probes/cudnn_frontend.py --output cudnn_frontend_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dilated_attention_pytorch.kernels import cudnn_frontend
from dilated_attention_pytorch.kernels.math import MathBackend
from dilated_attention_pytorch.kernels.sdpa import CudnnBackend


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-9))


def views(n: int, heads: int, kv_heads: int, d: int, dv: int, dilation: int, seg: int, dtype: torch.dtype):
    """Branch-problem views ``(segments, heads, seg // dilation, d)`` of ``(1, n, heads, d)``
    tensors (heads 1.. of them), as the fused path makes them, and fresh destinations
    laid out the same way."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def view(x: torch.Tensor, h: int) -> torch.Tensor:
        hh, dd = x.shape[2:]
        return x.as_strided(
            (n // seg, h, seg // dilation, dd),
            (seg * hh * dd, dd, dilation * hh * dd, 1),
            x.storage_offset() + dd,
        )

    big = [torch.randn(1, n, h + 1, dim, device="cuda", generator=g).to(dtype)
           for h, dim in ((heads, d), (kv_heads, d), (kv_heads, dv), (heads, dv))]  # fmt: skip
    q, k, v, do = (view(x, h) for x, h in zip(big, (heads, kv_heads, kv_heads, heads)))
    dests = [torch.zeros_like(x) for x in big]
    out_dest, dq_dest, dk_dest, dv_dest = (
        view(x, h)
        for x, h in zip((dests[3], dests[0], dests[1], dests[2]), (heads, heads, kv_heads, kv_heads))
    )
    return (q, k, v, do), (out_dest, dq_dest, dk_dest, dv_dest)


def check(kv_heads: int, d: int, dv: int, causal: bool, dtype: torch.dtype) -> dict[str, Any]:
    backend = cudnn_frontend.CudnnFrontendBackend()
    (q, k, v, do), (out_dest, dq_dest, dk_dest, dv_dest) = views(8192, 4, kv_heads, d, dv, 2, 2048, dtype)
    scale = d**-0.5
    record: dict[str, Any] = {"kv_heads": kv_heads, "d": d, "dv": dv, "causal": causal, "dtype": str(dtype)}
    try:
        t0 = time.perf_counter()
        out, lse, state = backend.forward(q, k, v, None, causal, scale)
        torch.cuda.synchronize()
        record["first_forward_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        grads = backend.backward(do, q, k, v, out, lse, None, causal, scale, state)
        torch.cuda.synchronize()
        record["first_backward_s"] = round(time.perf_counter() - t0, 3)
        math = MathBackend()
        qd, kd, vd, dod = (x.double() for x in (q, k, v, do))
        e_out, e_lse, _ = math.forward(qd, kd, vd, None, causal, scale)
        e_grads = math.backward(dod, qd, kd, vd, e_out, e_lse, None, causal, scale, None)
        record["out"], record["lse"] = relative(out, e_out), relative(lse, e_lse)
        for name, a, b in zip(("dq", "dk", "dv"), grads, e_grads):
            record[name] = relative(a, b)
        lse_into, _ = backend.forward_into(q, k, v, causal, scale, out_dest)
        backend.backward_into(
            do, q, k, v, out_dest, lse_into, causal, scale, None, (dq_dest, dk_dest, dv_dest)
        )
        record["into_out"] = relative(out_dest, e_out)
        for name, a, b in zip(("into_dq", "into_dk", "into_dv"), (dq_dest, dk_dest, dv_dest), e_grads):
            record[name] = relative(a, b)
    except Exception as e:  # a probe reports what fails
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-3000:]
    return record


def host_time(backend: Any, repeats: int = 200) -> float:
    """Microseconds per forward call of a tiny problem, host-bound."""
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    for _ in range(10):
        backend.forward(q, k, v, None, False, 0.125)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.forward(q, k, v, None, False, 0.125)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    import cudnn

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "frontend": cudnn_frontend.installed_version(),
        "cudnn_backend": cudnn.backend_version(),
        "reasons": cudnn_frontend.CudnnFrontendBackend().not_supported_reasons(
            cudnn_frontend.AttentionSpec(
                "cuda", torch.bfloat16, 64, False, torch.cuda.get_device_capability()
            )
        ),
    }
    print(json.dumps(info), flush=True)
    records = []
    for dtype in (torch.bfloat16, torch.float16):
        for kv_heads, d, dv in ((4, 64, 64), (2, 64, 64), (4, 128, 128), (4, 64, 128), (2, 128, 64)):
            for causal in (False, True):
                record = check(kv_heads, d, dv, causal, dtype)
                print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
                if "traceback" in record:
                    print(record["traceback"], flush=True)
                records.append(record)
    info["host_us_per_forward"] = {
        "cudnn_frontend": host_time(cudnn_frontend.CudnnFrontendBackend()),
        "sdpa_cudnn": host_time(CudnnBackend()),
    }
    print(json.dumps(info["host_us_per_forward"]), flush=True)
    info["records"] = records
    if args.output:
        args.output.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
