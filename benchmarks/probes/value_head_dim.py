"""Which kernel backends take a value head_dim other than the query's: each
backend's forward and backward against the math backend in float64, every
dtype, causal or not, whatever the backend declares (the GPU test
``test_backend_takes_a_value_head_dim_as_declared`` keeps the declarations true).

    python benchmarks/probes/value_head_dim.py --output value_head_dim.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dilated_attention_pytorch import kernels
from dilated_attention_pytorch.kernels.math import MathBackend

HEAD_DIMS = [(64, 32), (128, 64), (64, 128), (128, 128), (32, 64), (96, 64)]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-9))


def probe(
    backend: kernels.KernelBackend, device: str, dtype: torch.dtype, d: int, dv: int, causal: bool
) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    kv_heads = 2 if backend.SUPPORTS_GQA else 4
    q = torch.randn(2, 4, 300, d, device=device, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, 300, d, device=device, generator=g).to(dtype)
    v = torch.randn(2, kv_heads, 300, dv, device=device, generator=g).to(dtype)
    do = torch.randn(2, 4, 300, dv, device=device, generator=g).to(dtype)
    record: dict[str, Any] = {
        "backend": backend.name,
        "dtype": str(dtype),
        "d": d,
        "dv": dv,
        "causal": causal,
    }
    scale = d**-0.5
    try:
        out, lse, state = backend.forward(q, k, v, None, causal, scale)
        grads = backend.backward(do, q, k, v, out, lse, None, causal, scale, state)
    except RuntimeError as error:
        return {**record, "ok": False, "error": str(error)[:300]}
    q64, k64, v64 = (x.double() for x in (q, k, v))
    exp_out, exp_lse, _ = MathBackend().forward(q64, k64, v64, None, causal, scale)
    expected = MathBackend().backward(do.double(), q64, k64, v64, exp_out, exp_lse, None, causal, scale, None)
    errors = {"out": relative(out, exp_out), "lse": relative(lse.reshape(exp_lse.shape), exp_lse)}
    errors.update({f"d{name}": relative(a, b) for name, a, b in zip("qkv", grads, expected)})
    return {**record, "ok": True, **errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if device == "cuda" else [torch.float32]
    records = []
    for backend in kernels.REGISTRY.values():
        assert isinstance(backend, kernels.KernelBackend)
        devices = backend.SUPPORTED_DEVICES
        if backend.name == "math" or backend.missing_reasons() or (devices and device not in devices):
            continue
        for dtype in dtypes:
            for d, dv in HEAD_DIMS:
                for causal in (False, True):
                    records.append(probe(backend, device, dtype, d, dv, causal))
                    print(json.dumps(records[-1]), flush=True)
    if args.output:
        args.output.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
