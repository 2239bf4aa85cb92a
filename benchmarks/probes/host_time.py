"""Where the fused path's time goes at short lengths, on W1 (12 heads of 64, bf16):
per backend, head mode and mask, the GPU time of an eager call (CUDA events),
the host time of the same call while the GPU is kept busy (so the host never
waits on it: what it costs to enqueue), and the time of its CUDA-graph replay
(no host time at all); then the CPU time per torch op of eager calls
(``torch.profiler``), which says which calls the host time is made of; with
``--python-profile`` the host time per Python function of calls behind a GPU
sleep (``cProfile``: the fused path's own Python beside the ops it calls).

    python benchmarks/probes/host_time.py --seq-lens 32768 --output host.json --profile host_ops.txt
    python benchmarks/probes/host_time.py --seq-lens 32768 --python-profile host_python.txt
    python benchmarks/probes/host_time.py --seq-lens 32768 --no-timings --queue-depths 1 3 10 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import HOST_CALLS, WORKLOADS, Timer, fwd_bwd, host_ms

from dilated_attention_pytorch import DilatedPattern, dilated_attention, kernels


def steps(workload: str, n: int, head_mode: str, causal: bool, backend: str) -> dict[str, Callable[[], Any]]:
    w = WORKLOADS[workload]
    shape = (1, n, w["heads"], w["head_dim"])
    q, k, v, g = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkvg")
    pattern = DilatedPattern(w["segment_lengths"], w["dilation_rates"], head_mode)

    def forward() -> torch.Tensor:
        return dilated_attention(q, k, v, pattern, backend=backend, is_causal=causal)

    def forward_only() -> None:
        with torch.no_grad():
            forward()

    return {"fwd": forward_only, "fwdbwd": fwd_bwd(forward, (q, k, v), g.detach())}


def record(workload: str, n: int, head_mode: str, causal: bool, backend: str) -> dict[str, Any]:
    found: dict[str, Any] = {"workload": workload, "n": n, "head_mode": head_mode, "causal": causal}
    found["backend"] = backend
    eager, graphed = Timer(torch.device("cuda"), 3, 15), Timer(torch.device("cuda"), 3, 15, cuda_graph=True)
    for name, fn in steps(workload, n, head_mode, causal, backend).items():
        found[f"{name}_gpu_ms"] = eager(fn)
        found[f"{name}_host_ms"] = host_ms(fn, HOST_CALLS[name])
        try:
            found[f"{name}_graph_ms"] = graphed(fn)
        except RuntimeError as error:  # not capturable: say why
            found[f"{name}_graph_ms"] = None
            found[f"{name}_graph_error"] = str(error).splitlines()[0]
            torch.cuda.synchronize()
    return found


ALLOCATOR_STATS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def first_sync(fn: Callable[[], Any]) -> str | None:
    """Where ``fn`` first makes the host wait for the GPU (None: nowhere torch flags)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return traceback.format_exc(limit=-12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return None


def sampled_stacks(fn: Callable[[], Any], calls: int, behind_sleep: bool, top: int = 6) -> str:
    """Where the host spends ``calls`` calls of ``fn``: every thread's Python stack
    (autograd runs the backward on its own) sampled every millisecond, the most frequent innermost
    frames (of this package, torch or cudnn) with their counts. ``behind_sleep``:
    the GPU is kept busy first, so a call that waits for it shows where."""
    import collections
    import threading

    me, samples, done = threading.get_ident(), collections.Counter(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            for ident, frame in sys._current_frames().items():
                stack = []
                while frame is not None and ident != me and len(stack) < 4:
                    name = frame.f_code.co_filename
                    if "dilated_attention_pytorch" in name or "torch" in name or "cudnn" in name:
                        stack.append(f"{name.split('/')[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
                    frame = frame.f_back
                if stack:
                    samples[" < ".join(stack)] += 1
            time.sleep(0.001)

    torch.cuda.synchronize()
    if behind_sleep:
        torch.cuda._sleep(400_000_000)
    thread = threading.Thread(target=sample)
    thread.start()
    for _ in range(calls):
        fn()
    done.set()
    thread.join()
    torch.cuda.synchronize()
    total = sum(samples.values())
    return "\n".join(f"  {count}/{total}  {stack}" for stack, count in samples.most_common(top))


def op_profile(workload: str, n: int, head_mode: str, causal: bool, backend: str) -> str:
    """Per step: the allocator's device allocations, frees and retries over 10
    steady calls, where it first synchronizes, and host time per op and CUDA call."""
    from torch.profiler import ProfilerActivity, profile

    text = []
    for name, fn in steps(workload, n, head_mode, causal, backend).items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()
        stats = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_STATS}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        text.append(
            f"## {workload} {n} {head_mode} causal={causal} {backend} {name} (10 calls)\n"
            f"allocator over 10 calls: {stats}\nfirst sync: {first_sync(fn)}\n"
            f"host stacks behind a GPU sleep (3 calls):\n{sampled_stacks(fn, 3, True)}\n"
            f"host stacks (100 calls):\n{sampled_stacks(fn, 100, False, 12)}\n{table}"
        )
    return "\n".join(text)


def queue_depths(workload: str, n: int, head_mode: str, causal: bool, backend: str, depths: list[int]) -> str:
    """Host milliseconds per forward+backward against how many are enqueued behind
    one GPU sleep: flat while every launch fits CUDA's launch queue, rising once
    the queue is full and a launch waits for the GPU to take one."""
    fn = steps(workload, n, head_mode, causal, backend)["fwdbwd"]
    for _ in range(3):
        fn()
    found = {depth: host_ms(fn, depth) for depth in depths}
    shown = ", ".join(f"{depth}: {ms:.3f}" for depth, ms in found.items())
    case = f"{workload} {n} {head_mode} causal={causal} {backend}"
    return f"{case}: host ms per fwdbwd by calls queued {{{shown}}}"


def python_profile(workload: str, n: int, head_mode: str, causal: bool, backend: str, calls: int = 3) -> str:
    """Host time per Python function over ``calls`` calls of each step, behind a
    GPU sleep so that no call waits for the GPU: by own time and by time inside. The
    backward runs on the calling thread (autograd's device threads are not profiled).
    Few calls: more can fill CUDA's launch queue, and then whichever launch finds it
    full takes the wait (:func:`queue_depths` shows where that starts)."""
    import cProfile
    import io
    import pstats

    text = []
    for name, fn in steps(workload, n, head_mode, causal, backend).items():
        with torch.autograd.set_multithreading_enabled(False):
            # warm up on this thread: torch caches cuDNN's attention graphs per thread, and
            # a thread's first call of a shape builds one, which waits for the GPU
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000_000)  # about 0.5 s of GPU clock
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        with torch.autograd.set_multithreading_enabled(False):
            profiler.enable()
            for _ in range(calls):
                fn()
            profiler.disable()
        wall = (time.perf_counter() - t0) * 1e3 / calls
        torch.cuda.synchronize()
        for order in ("tottime", "cumtime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(30)
            body = out.getvalue().split("\n", 3)[-1]  # past the header lines
            text.append(
                f"## {workload} {n} {head_mode} causal={causal} {backend} {name}: {calls} calls, "
                f"{wall:.3f} ms host per call under the profiler, by {order}\n{body}"
            )
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    p.add_argument("--backends", nargs="+", default=["sdpa_cudnn"])
    p.add_argument("--output", type=Path)
    p.add_argument("--profile", type=Path)
    p.add_argument("--python-profile", type=Path, help="host time per Python function (cProfile)")
    p.add_argument("--profile-calls", type=int, default=3, help="calls per step under cProfile")
    p.add_argument("--queue-depths", type=int, nargs="+", help="host time by calls queued behind a sleep")
    p.add_argument("--no-timings", action="store_true", help="only the profiles")
    args = p.parse_args()
    rows = []
    for backend in [] if args.no_timings else args.backends:
        if backend not in kernels.REGISTRY:
            print(f"skipping {backend}: not registered", flush=True)
            continue
        for n in args.seq_lens:
            for head_mode in ("grouped", "all"):
                for causal in (False, True):
                    rows.append(record(args.workload, n, head_mode, causal, backend))
                    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}
                    print(json.dumps(shown), flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(info, indent=1))
    cases = [
        (args.workload, args.seq_lens[0], m, c, args.backends[0])
        for m in ("grouped", "all")
        for c in (False, True)
    ]
    if args.queue_depths:
        for case in cases:
            print(queue_depths(*case, args.queue_depths), flush=True)
    if args.profile:
        args.profile.write_text("\n\n".join(op_profile(*case) for case in cases))
    if args.python_profile:
        texts = [python_profile(*case, calls=args.profile_calls) for case in cases]
        args.python_profile.write_text("\n\n".join(texts))


if __name__ == "__main__":
    main()
