"""What the package's Triton kernels share: whether Triton is installed, which
tensors they run on, the device guard of a launch and the tile of a kernel over
rows of ``head_dim`` elements.

Kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before the first import), which is how their tests
run on a machine without a GPU."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(*tensors: Tensor) -> bool:
    """Whether a Triton kernel here can take ``tensors``."""
    if not AVAILABLE:
        return False
    return all(x.is_cuda or (INTERPRETED and x.device.type == "cpu") for x in tensors)


def launch_device(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """The device a kernel on ``x`` launches on (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def tiles(head_dim: int, elements: int = 4096) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)``: rows of ``head_dim`` elements per program, about ``elements`` elements."""
    block_d = 1 << max(0, head_dim - 1).bit_length()
    return max(1, elements // block_d), block_d


if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def batch_rows(rows_per_batch, num_heads, BLOCK_R: tl.constexpr):
        """``(position, head, batch, in_range)`` of a program's rows over ``(position,
        head)`` pairs of batch element ``program_id(1)``: int32 (``rows_per_batch <
        2**31``; 64-bit division made these kernels instruction-bound), the batch int64."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows // num_heads, rows % num_heads, tl.program_id(1).to(tl.int64), rows < rows_per_batch
