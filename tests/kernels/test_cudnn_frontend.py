"""The ``cudnn_frontend`` backend on the CPU, through a stand-in for cuDNN's graph
API: the stand-in rebuilds every operand from the bare address and the geometry
the backend declared for it, and runs the math backend there. So the graphs'
declared shapes, strides and operand order are checked against what the fused
path really passes (strided views, into-place destinations, shared key/value
heads, a value head_dim of its own), against the reference. The GPU tests run
the real library."""

from __future__ import annotations

import ctypes
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dilated_attention_pytorch import DilatedPattern, dilated_attention, kernels
from dilated_attention_pytorch.kernels import cudnn_frontend
from dilated_attention_pytorch.kernels.math import MathBackend
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, assert_close, grads, held_by_cycles, make_strided, strided_view


class _Operand:
    def __init__(self, name: str, dim: list[int], stride: list[int], data_type: Any, uid: int) -> None:
        self.name, self.dim, self.stride, self.data_type, self.uid = name, dim, stride, data_type, uid

    def set_uid(self, uid: int) -> _Operand:
        self.uid = uid
        return self

    def set_output(self, _: bool) -> _Operand:
        return self

    def set_dim(self, dim: list[int]) -> _Operand:
        self.dim = dim
        return self

    def set_stride(self, stride: list[int]) -> _Operand:
        self.stride = stride
        return self

    def set_data_type(self, data_type: Any) -> _Operand:
        self.data_type = data_type
        return self


def _at(address: int, operand: _Operand) -> torch.Tensor:
    """The tensor at ``address`` with the operand's declared geometry (dtype: its data type)."""
    dtype = operand.data_type
    span = 1 + sum((d - 1) * s for d, s in zip(operand.dim, operand.stride))
    buffer = (ctypes.c_byte * (span * dtype.itemsize)).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype).as_strided(operand.dim, operand.stride)


class _Graph:
    executions: list[_Graph] = []
    leave_cycles = False

    def __init__(self, **_: Any) -> None:
        self.operands: list[_Operand] = []
        self.kind = ""
        self.params: dict[str, Any] = {}

    def tensor(self, name: str, dim: list[int], stride: list[int], data_type: Any, uid: int) -> _Operand:
        self.operands.append(_Operand(name, dim, stride, data_type, uid))
        return self.operands[-1]

    def _outputs(self, kind: str, names: tuple[str, ...], params: dict[str, Any]) -> list[_Operand]:
        self.kind, self.params = kind, params
        outs = [_Operand(name, [], [], None, -1) for name in names]
        self.operands += outs
        return outs

    def sdpa(self, name: str, q: _Operand, k: _Operand, v: _Operand, **params: Any) -> list[_Operand]:
        assert params.pop("generate_stats") is True
        return self._outputs("forward", ("o", "stats"), params)

    def sdpa_backward(self, name: str, **ports: Any) -> list[_Operand]:
        params = {
            key: ports.pop(key) for key in list(ports) if key not in ("q", "k", "v", "o", "dO", "stats")
        }
        return self._outputs("backward", ("dq", "dk", "dv"), params)

    def validate(self) -> None: ...
    def build_operation_graph(self) -> None: ...
    def create_execution_plans(self, modes: list[Any]) -> None: ...
    def check_support(self) -> None: ...
    def build_plans(self) -> None:
        if _Graph.leave_cycles:  # as the real build does: garbage that reaches the caller's frames
            import sys

            cycle: list[Any] = [sys._getframe()]
            cycle.append(cycle)

    def get_workspace_size(self) -> int:
        return 64

    def execute(self, pointers: list[int], workspace: int, handle: Any, tensor_uids: tuple[int, ...]) -> None:
        assert all(isinstance(p, int) for p in pointers) and isinstance(workspace, int)
        by_uid = {o.uid: o for o in self.operands}
        x = {by_uid[uid].name: _at(p, by_uid[uid]) for uid, p in zip(tensor_uids, pointers)}
        causal = self.params.get("diagonal_band_right_bound") == 0
        scale = self.params["attn_scale"]
        math_backend = MathBackend()
        if self.kind == "forward":
            out, lse, _ = math_backend.forward(x["q"], x["k"], x["v"], None, causal, scale)
            x["o"].copy_(out)
            x["stats"].copy_(lse[..., None])
        else:
            lse = x["stats"][..., 0]
            parts = math_backend.backward(
                x["dO"], x["q"], x["k"], x["v"], x["o"], lse, None, causal, scale, None
            )
            for name, part in zip(("dq", "dk", "dv"), parts):
                x[name].copy_(part)
        _Graph.executions.append(self)


@pytest.fixture
def stand_in(monkeypatch):
    """The backend on the CPU, its cuDNN calls served by :class:`_Graph`."""
    fake = SimpleNamespace(
        pygraph=_Graph,
        data_type=SimpleNamespace(FLOAT=torch.float32),
        heur_mode=SimpleNamespace(A="A", FALLBACK="FALLBACK"),
        diagonal_alignment=SimpleNamespace(TOP_LEFT="top_left"),
    )
    monkeypatch.setattr(cudnn_frontend, "_cudnn", lambda: fake)
    monkeypatch.setattr(cudnn_frontend, "_handle", lambda device: None)
    monkeypatch.setattr(cudnn_frontend, "_io_type", lambda dtype: dtype)  # the stand-in reads dtypes
    monkeypatch.setattr(cudnn_frontend, "installed_version", lambda: cudnn_frontend.TESTED_VERSIONS[0])
    for name, value in (
        ("SUPPORTED_DEVICES", None),
        ("SUPPORTED_DTYPES", None),
        ("MIN_COMPUTE_CAPABILITY", None),
    ):
        monkeypatch.setattr(cudnn_frontend.CudnnFrontendBackend, name, value)
    cudnn_frontend._forward_graph.cache_clear()
    cudnn_frontend._backward_graph.cache_clear()
    _Graph.executions.clear()
    yield
    _Graph.leave_cycles = False
    cudnn_frontend._forward_graph.cache_clear()
    cudnn_frontend._backward_graph.cache_clear()


@pytest.mark.parametrize("head_mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "seq_major", "packed_qkv", "step_heads"])
def test_fused_path_on_the_stand_in_matches_reference(stand_in, head_mode, causal, layout):
    """float32 through the backend's graphs (outputs and gradients into place where
    the fused path asks for it) against the float64 reference."""
    shape = (2, 48, 6, 8)
    made = [make_strided(layout, shape, torch.float32, "cpu", seed) for seed in range(3)]
    leaves = [leaf for leaf, _ in made]
    seg, dil = [8, 16, 48], [1, 2, 4]
    pattern = DilatedPattern(seg, dil, head_mode)
    out = dilated_attention(*(view for _, view in made), pattern, is_causal=causal, backend="cudnn_frontend")
    expected_inputs = [view.detach().double().requires_grad_() for _, view in made]
    expected = reference(*expected_inputs, seg, dil, head_mode=head_mode, is_causal=causal)
    assert_close(out, expected, torch.float32, f"{layout} out")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, leaves, g.float()), grads(expected, expected_inputs, g)):
        # a leaf's gradient holds the view's at the view's elements
        assert_close(strided_view(layout, a, shape), b, torch.float32, f"{layout} d{name}")
    kinds = {graph.kind for graph in _Graph.executions}
    assert kinds == {"forward", "backward"}, kinds


@pytest.mark.parametrize("value_dim", [8, 16])
def test_shared_key_value_heads_and_a_value_head_dim(stand_in, value_dim):
    q = torch.randn(1, 40, 8, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(1, 40, 2, 8, dtype=torch.float32, requires_grad=True)
    v = torch.randn(1, 40, 2, value_dim, dtype=torch.float32, requires_grad=True)
    pattern = DilatedPattern([8, 20], [1, 2], "grouped")
    out = dilated_attention(q, k, v, pattern, is_causal=True, backend="cudnn_frontend")
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = reference(*inputs, [8, 20], [1, 2], is_causal=True)
    assert out.shape == (1, 40, 8, value_dim)
    assert_close(out, expected, torch.float32, "out")
    g = torch.randn_like(expected)
    for name, a, b in zip("qkv", grads(out, (q, k, v), g.float()), grads(expected, inputs, g)):
        assert_close(a, b, torch.float32, f"d{name}")


def test_graphs_are_built_once_per_geometry(stand_in):
    backend = kernels.REGISTRY["cudnn_frontend"]
    q, k, v = (torch.randn(3, 2, 16, 8) for _ in "qkv")
    for _ in range(3):
        out, lse, state = backend.forward(q, k, v, None, False, 0.25)
        backend.backward(torch.ones_like(out), q, k, v, out, lse, None, False, 0.25, state)
    assert cudnn_frontend._forward_graph.cache_info().misses == 1
    assert cudnn_frontend._backward_graph.cache_info().misses == 1
    backend.forward(q, k, v, None, True, 0.25)  # causal: another graph
    assert cudnn_frontend._forward_graph.cache_info().misses == 2
    expected, expected_lse, _ = MathBackend().forward(q.double(), k.double(), v.double(), None, False, 0.25)
    assert (out.double() - expected).abs().max() <= TOLERANCES[torch.float32] * expected.abs().max()
    assert (lse.double() - expected_lse).abs().max() <= 1e-5 * math.log(16)


def test_a_step_that_builds_graphs_leaves_no_cycle_holding_its_tensors(stand_in):
    """A graph build leaves cyclic garbage reaching the calling frames (on an H200 that
    kept the step's gradients alive and made autograd copy them); the backend collects
    it, so the step's tensors go with their last reference even with ``gc`` off."""
    _Graph.leave_cycles = True

    def step() -> tuple[torch.Tensor | None, ...]:
        q, k, v = (torch.randn(1, 32, 4, 8, requires_grad=True) for _ in "qkv")
        out = dilated_attention(q, k, v, DilatedPattern([8, 16], [1, 2]), backend="cudnn_frontend")
        out.backward(torch.randn_like(out))
        return q, k, v, out, q.grad, k.grad, v.grad

    alive = held_by_cycles(step)
    assert len(_Graph.executions) > 0
    assert alive == [], f"held by a cycle (q, k, v, out, dq, dk, dv): {alive}"
