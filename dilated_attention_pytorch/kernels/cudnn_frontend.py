"""cuDNN's fused attention through its graph API (the ``nvidia-cudnn-frontend``
package), when installed.

Optional: nothing imports it unless the backend is asked to run. SDPA's cuDNN
op returns fresh tensors, which the fused path then copies into place; a cuDNN
graph names the shape and strides of every tensor it reads and writes, so here
a branch problem's output and gradients go straight into their strided places
(grouped heads, "all"-mode compact rows), and a ``grad_out`` laid out unlike
``out`` needs no copy. A graph is built once per geometry (shapes, strides,
dtype, causality, scale) and cached: the first call of each branch problem
pays its build. The graph API is public; ``TESTED_VERSIONS`` says which
releases this module was run against on a GPU.
"""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any

import torch
from torch import Tensor

from .base import AttentionSpec, DestinationKernelBackend, StrideRule, distribution_version
from .sdpa import cudnn_length_reasons

#: releases this module was run against (H200, torch 2.11, cuDNN 9.19)
TESTED_VERSIONS: tuple[str, ...] = ("1.32.0",)

#: graphs kept per process: one per branch problem geometry and pass
GRAPH_CACHE_SIZE = 512

# operand uids of the graphs (fixed: the cache key describes the rest)
_Q, _K, _V, _O, _STATS, _DO, _DQ, _DK, _DV = range(1, 10)
_FORWARD_UIDS = (_Q, _K, _V, _O, _STATS)
_BACKWARD_UIDS = (_Q, _K, _V, _O, _DO, _STATS, _DQ, _DK, _DV)


@functools.cache
def installed_version() -> str | None:
    return distribution_version("cudnn", "nvidia-cudnn-frontend")


def _cudnn() -> Any:
    import cudnn

    return cudnn


#: (shape, strides) of a tensor: what a graph is built for
Geometry = tuple[tuple[int, ...], tuple[int, ...]]


def _geometry(x: Tensor) -> Geometry:
    return tuple(x.shape), tuple(x.stride())


_local = threading.local()


def _handle(device: torch.device) -> Any:
    """This thread's cuDNN handle on ``device`` (handles are not thread-safe: the
    backward runs on autograd's threads), bound to torch's current stream."""
    cudnn = _cudnn()
    handles = _local.__dict__.setdefault("handles", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in handles:
        with torch.cuda.device(index):
            handles[index] = cudnn.create_handle()
    cudnn.set_stream(handle=handles[index], stream=torch.cuda.current_stream(index).cuda_stream)
    return handles[index]


def _io_type(dtype: torch.dtype) -> Any:
    types = _cudnn().data_type
    return types.BFLOAT16 if dtype == torch.bfloat16 else types.HALF


def _tensor(graph: Any, name: str, uid: int, geometry: Geometry, data_type: Any) -> Any:
    shape, stride = geometry
    return graph.tensor(name=name, dim=list(shape), stride=list(stride), data_type=data_type, uid=uid)


def _output(t: Any, uid: int, geometry: Geometry, data_type: Any) -> None:
    shape, stride = geometry
    t.set_uid(uid).set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(data_type)


def _stats_geometry(q: Geometry) -> Geometry:
    """The lse as cuDNN's ``(b, h, len, 1)`` float32 stats, contiguous."""
    b, h, n = q[0][:3]
    return (b, h, n, 1), (h * n, n, 1, 1)


def _new_graph(device: torch.device, dtype: torch.dtype) -> Any:
    cudnn = _cudnn()
    return cudnn.pygraph(
        handle=_handle(device),
        io_data_type=_io_type(dtype),
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
    )


def _mask(causal: bool) -> dict[str, Any]:
    # causal: keys up to the query's own position, the diagonal from the top left
    if not causal:
        return {}
    return {"diagonal_alignment": _cudnn().diagonal_alignment.TOP_LEFT, "diagonal_band_right_bound": 0}


def _built(graph: Any) -> tuple[Any, int]:
    """``(graph, workspace bytes)``, built with the plan heuristics rank first (the
    backward's workspace is its float32 dq accumulator: 2.03x the problem's q).

    A build (and the first ``import cudnn``) leaves cyclic garbage that reaches the
    calling frames, and so the step's tensors: autograd then found more than one
    reference to the returned gradients and copied them (an H200 step that built
    its graphs peaked at 1.38x io, the next at 1.07x). Collected here, once per build."""
    cudnn = _cudnn()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    gc.collect()
    return graph, graph.get_workspace_size()


@functools.lru_cache(maxsize=GRAPH_CACHE_SIZE)
def _forward_graph(
    device: torch.device, dtype: torch.dtype, q: Geometry, k: Geometry, v: Geometry, o: Geometry,
    causal: bool, scale: float,
) -> tuple[Any, int]:  # fmt: skip
    graph, io = _new_graph(device, dtype), _io_type(dtype)
    ins = [_tensor(graph, name, uid, x, io) for name, uid, x in (("q", _Q, q), ("k", _K, k), ("v", _V, v))]
    out, stats = graph.sdpa(
        name="forward", q=ins[0], k=ins[1], v=ins[2], generate_stats=True, attn_scale=scale, **_mask(causal)
    )
    _output(out, _O, o, io)
    _output(stats, _STATS, _stats_geometry(q), _cudnn().data_type.FLOAT)
    return _built(graph)


@functools.lru_cache(maxsize=GRAPH_CACHE_SIZE)
def _backward_graph(
    device: torch.device, dtype: torch.dtype, q: Geometry, k: Geometry, v: Geometry, o: Geometry,
    do: Geometry, dq: Geometry, dk: Geometry, dv: Geometry, causal: bool, scale: float,
) -> tuple[Any, int]:  # fmt: skip
    graph, io = _new_graph(device, dtype), _io_type(dtype)
    named = (("q", _Q, q), ("k", _K, k), ("v", _V, v), ("o", _O, o), ("dO", _DO, do))
    ins = {name: _tensor(graph, name, uid, x, io) for name, uid, x in named}
    stats = _tensor(graph, "stats", _STATS, _stats_geometry(q), _cudnn().data_type.FLOAT)
    grads = graph.sdpa_backward(name="backward", **ins, stats=stats, attn_scale=scale, **_mask(causal))
    for t, uid, x in zip(grads, (_DQ, _DK, _DV), (dq, dk, dv)):
        _output(t, uid, x, io)
    return _built(graph)


def _execute(graph: Any, workspace_bytes: int, buffers: list[Tensor], uids: tuple[int, ...]) -> None:
    device = buffers[0].device
    workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device)
    # bare addresses: the graph already knows every geometry, and the frontend then
    # holds no reference to our tensors past the call (given tensors, the peak was
    # higher on an H200; with addresses it still depends on call order: docs)
    pointers = [x.data_ptr() for x in buffers]
    graph.execute(pointers, workspace.data_ptr(), handle=_handle(device), tensor_uids=uids)


class CudnnFrontendBackend(DestinationKernelBackend):
    name = "cudnn_frontend"
    description = (
        "cuDNN's fused attention through its graph API (nvidia-cudnn-frontend) when installed; "
        "writes outputs and gradients straight into place"
    )

    # cuDNN takes any strides that keep 16-byte alignment, last dim contiguous
    strides = StrideRule(last_dim_contiguous=True, alignment=16)

    MIN_COMPUTE_CAPABILITY = (9, 0)
    HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 128
    SUPPORTS_GQA = True
    SUPPORTS_VALUE_HEAD_DIM = True

    PACKAGE, EXTRA, TESTED_RELEASES = "nvidia-cudnn-frontend", "cudnn", TESTED_VERSIONS

    def package_version(self) -> str | None:
        return installed_version()

    def quirk_reasons(self, spec: AttentionSpec, reasons: list[str]) -> list[str]:
        quirks = []
        if spec.compute_capability is not None and spec.compute_capability[0] > 9:
            # cuDNN has kernels for newer GPUs, but this module never ran on one
            quirks.append(f"tested on compute capability 9.x (H200) only, got {spec.compute_capability}")
        return quirks + cudnn_length_reasons(spec)

    def run_forward(self, q, k, v, causal, scale, out):
        if out is None:
            out = q.new_empty(*q.shape[:3], v.shape[3])
        stats = torch.empty(*q.shape[:3], 1, dtype=torch.float32, device=q.device)
        geometries = (_geometry(x) for x in (q, k, v, out))
        graph, workspace = _forward_graph(q.device, q.dtype, *geometries, causal, float(scale))
        _execute(graph, workspace, [q, k, v, out, stats], _FORWARD_UIDS)
        return out, stats[..., 0]

    def run_backward(self, grad_out, q, k, v, out, lse, causal, scale, grads):
        if grads is None:
            grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        stats = lse.contiguous()[..., None]
        geometries = (_geometry(x) for x in (q, k, v, out, grad_out, *grads))
        graph, workspace = _backward_graph(q.device, q.dtype, *geometries, causal, float(scale))
        _execute(graph, workspace, [q, k, v, out, grad_out, stats, *grads], _BACKWARD_UIDS)
        return grads
