"""Where the ``cudnn_frontend`` backend spends memory and host time beside
``sdpa_cudnn``, on W1 (12 heads of 64, bf16): the forward+backward peak of the
fused path at 128K per backend, and whether a step's tensors outlive it until
the garbage collector runs; each graph's workspace bytes and plan name
against the problem's own size; and a cProfile of eager forwards at 32K,
where the host time shows.

    python benchmarks/probes/cudnn_frontend_costs.py --output costs.json --profile profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import weakref
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dilated_attention_pytorch import DilatedPattern, dilated_attention
from dilated_attention_pytorch.kernels import cudnn_frontend

PATTERN = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])


def inputs(n: int) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkvg"
    )


def peak_over_io(n: int, backend: str, head_mode: str, causal: bool = False) -> dict[str, Any]:
    """The forward+backward peak over io, and whether the step's tensors outlive it
    (held by reference cycles until the garbage collector runs: an order-dependent peak)."""
    q, k, v, g = inputs(n)
    pattern = DilatedPattern(*PATTERN, head_mode)
    dilated_attention(q, k, v, pattern, backend=backend, is_causal=causal).backward(g)  # graphs built
    for x in (q, k, v):
        x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dilated_attention(q, k, v, pattern, backend=backend, is_causal=causal).backward(g)
    torch.cuda.synchronize()
    found = {
        "peak_over_io": torch.cuda.max_memory_allocated() / (8 * q.nbytes),
        "io_mib": 8 * q.nbytes / 2**20,
    }
    refs = [weakref.ref(x) for x in (q, k, v, g, q.grad, k.grad, v.grad)]
    del q, k, v, g
    found["tensors_alive_after_the_step"] = sum(r() is not None for r in refs)
    found["mib_left_after_the_step"] = (torch.cuda.memory_allocated() - before) / 2**20
    found["objects_collected"] = gc.collect()
    found["tensors_alive_after_gc"] = sum(r() is not None for r in refs)
    return found


def first_call_allocations(n: int, backend: str, head_mode: str, causal: bool) -> dict[str, Any]:
    """The forward+backward peak over io of the first call of a geometry (where the
    graphs are built) against the second, and the first call's allocations of
    64 MiB or more with the frames that made them."""
    q, k, v, g = inputs(n)
    pattern = DilatedPattern(*PATTERN, head_mode)
    found: dict[str, Any] = {}
    for call in ("first", "second"):
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if call == "first":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        dilated_attention(q, k, v, pattern, backend=backend, is_causal=causal).backward(g)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base + 4 * q.nbytes
        found[f"{call}_peak_over_io"] = peak / (8 * q.nbytes)
        if call == "first":
            events = torch.cuda.memory._snapshot()["device_traces"][q.device.index or 0]
            torch.cuda.memory._record_memory_history(enabled=None)
            big = [e for e in events if e["action"] == "alloc" and e["size"] >= 64 * 2**20]
            found["first_big_allocations"] = [
                {
                    "mib": e["size"] / 2**20,
                    "frames": [
                        f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
                        for f in e["frames"]
                        if f["filename"].endswith(".py")
                    ][:8],
                }
                for e in big
            ]
    return found


def workspaces(n: int, head_mode: str, causal: bool = False) -> list[dict[str, Any]]:
    """Per graph execution: pass, workspace bytes over the bytes of the problem's q, plan name."""
    seen: list[dict[str, Any]] = []
    original = cudnn_frontend._execute

    def logged(graph: Any, workspace_bytes: int, buffers: list[torch.Tensor], uids: tuple[int, ...]) -> None:
        q = buffers[0]
        entry = {
            "pass": "forward" if len(buffers) == 5 else "backward",
            "q_shape": list(q.shape),
            "workspace_mib": round(workspace_bytes / 2**20, 2),
            "workspace_over_q": round(workspace_bytes / (q.numel() * q.element_size()), 3),
            "plan": graph.get_plan_name_at_index(getattr(graph, "_plan_index", 0)),
        }  # fmt: skip
        if entry not in seen:
            seen.append(entry)
        original(graph, workspace_bytes, buffers, uids)

    cudnn_frontend._execute = logged
    try:
        q, k, v, g = inputs(n)
        pattern = DilatedPattern(*PATTERN, head_mode)
        dilated_attention(q, k, v, pattern, backend="cudnn_frontend", is_causal=causal).backward(g)
        torch.cuda.synchronize()
    finally:
        cudnn_frontend._execute = original
    return seen


def host_profile(n: int) -> str:
    q, k, v, _ = inputs(n)
    pattern = DilatedPattern(*PATTERN, "grouped")
    with torch.no_grad():
        for _ in range(5):
            dilated_attention(q, k, v, pattern, backend="cudnn_frontend")
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            dilated_attention(q, k, v, pattern, backend="cudnn_frontend")
        torch.cuda.synchronize()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path)
    p.add_argument("--profile", type=Path)
    args = p.parse_args()
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for head_mode in ("grouped", "all"):
        for causal in (False, True):
            case = f"{head_mode}_{'causal' if causal else 'full'}"
            record[f"peak_over_io_{case}_sdpa_cudnn"] = peak_over_io(131072, "sdpa_cudnn", head_mode, causal)
            record[f"peak_over_io_{case}_cudnn_frontend"] = peak_over_io(
                131072, "cudnn_frontend", head_mode, causal
            )
            record[f"workspaces_{case}"] = workspaces(131072, head_mode, causal)
    print(
        json.dumps({k: v for k, v in record.items() if not k.startswith("workspaces")}, indent=1), flush=True
    )
    for key, entries in record.items():
        if key.startswith("workspaces"):
            for e in entries[:6]:
                print(key, e["pass"], e["q_shape"], e["workspace_mib"], e["workspace_over_q"], e["plan"])
    for backend in ("sdpa_cudnn", "cudnn_frontend"):
        for head_mode in ("grouped", "all"):
            case = f"first_call_{head_mode}_causal_{backend}"
            record[case] = first_call_allocations(65536, backend, head_mode, True)
            print(case, json.dumps(record[case])[:3000], flush=True)
    profile = host_profile(32768)
    print(profile[:6000], flush=True)
    if args.output:
        args.output.write_text(json.dumps(record, indent=1))
    if args.profile:
        args.profile.write_text(profile)


if __name__ == "__main__":
    main()
