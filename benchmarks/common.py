"""What every benchmark script shares: the workloads, CUDA-event timing (eager or
CUDA-graph replay), peak memory, forward+backward steps and progress bars.

Run the scripts from a checkout (``python benchmarks/run.py ...``): this
module sits beside them, and importing it puts the checkout's package first on
the path, so the benchmarks measure the code next to them."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

# the package of this checkout, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


WORKLOADS = {
    "W1": {
        "heads": 12,
        "head_dim": 64,
        "segment_lengths": [2048, 4096, 8192, 16384, 32768],
        "dilation_rates": [1, 2, 4, 6, 12],
    },
    "W2": {
        "heads": 16,
        "head_dim": 128,
        "segment_lengths": [2048, 4096, 8192, 16384, 32768, 65536],
        "dilation_rates": [1, 2, 4, 8, 16, 32],
    },
}


def progress(items: list, desc: str) -> Iterable:
    """A tqdm bar where tqdm is installed (the ``[bench]`` extra), a plain counter on stderr otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _counted(items, desc)
    return tqdm(items, desc=desc)


def _counted(items: list, desc: str) -> Iterable:
    for i, item in enumerate(items, 1):
        print(f"{desc}: {i}/{len(items)}", file=sys.stderr, flush=True)
        yield item


def cuda_graphed(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured once in a CUDA graph, after warm-ups on a side stream (they fill
    host-side caches and compile kernels); its replay has no host time per kernel.
    ``fn`` must read and write the same buffers every call (its outputs stay in the
    graph's memory pool until ``reset()``)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int, cuda_graph: bool = False) -> None:
        self.device, self.warmup, self.repeats, self.cuda_graph = device, warmup, repeats, cuda_graph

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of ``fn`` (of its CUDA-graph replay with ``cuda_graph``)."""
        if not (self.cuda_graph and self.device.type == "cuda"):
            return self._median(fn)
        graph = cuda_graphed(fn, self.device, self.warmup)
        try:
            return self._median(graph.replay)
        finally:
            # each graph keeps a private memory pool: give it back before the next one
            graph.reset()
            torch.cuda.empty_cache()

    def _median(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def peak_mib(device: torch.device, fn: Callable[[], Any], inputs: tuple[torch.Tensor, ...]) -> float | None:
    """Peak MiB allocated while ``fn`` runs, counting everything live (the inputs too)."""
    if device.type != "cuda":
        return None
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


#: calls per :func:`host_ms` of a forward, and of a forward+backward (W1 128K "all": 552 kernels)
HOST_CALLS = {"fwd": 3, "fwdbwd": 1}


def host_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median host milliseconds per call of ``fn`` behind a GPU sleep long enough
    that no call waits for the GPU: what it costs to enqueue. ``calls`` must keep
    the launches behind the sleep within CUDA's launch queue, about a thousand
    kernels on the H200 (ten W1 32K forward+backward steps of about 56 kernels fit,
    twenty do not: ``probes/host_time.py --queue-depths``); past it a launch waits
    for the GPU, and the time measured is the sleep's. So :data:`HOST_CALLS`."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # about 0.2 s of GPU clock
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
        torch.cuda.synchronize()
    return statistics.median(times)


def fwd_bwd(
    fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        for x in inputs:
            x.grad = None
        fn().backward(grad)

    return step
