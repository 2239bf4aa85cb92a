"""Spawning gloo (or NCCL) process groups for the distributed tests, each test in
fresh processes, under a process-group timeout and a harness timeout: a hang is
a failure with a message, never a stuck CI."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: seconds a collective may wait before the process group gives up
PG_TIMEOUT_S = 60
#: seconds all ranks of one test may take
HARNESS_TIMEOUT_S = 300


def init(rank: int, world: int, init_file: str, backend: str = "gloo") -> None:
    # the ranks share the machine's cores: one thread each, not a full pool each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )


def spawn(fn: Callable[..., None], world: int, tmp_path: Any, timeout_s: float = HARNESS_TIMEOUT_S) -> dict:
    """Run ``fn(rank, world, init_file, results)`` on ``world`` fresh processes; the
    per-rank values ``fn`` puts in ``results``."""
    results = mp.Manager().dict()
    context = mp.start_processes(
        fn, args=(world, str(tmp_path / "init"), results), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise AssertionError(
                f"{world} ranks of {fn.__name__} did not finish within {timeout_s} s (hang?)"
            )
    return dict(results)
