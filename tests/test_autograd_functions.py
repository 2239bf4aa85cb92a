"""The package's ``torch.autograd.Function`` classes under ``torch.compile``.

torch 2.11's dynamo drops the incoming gradient of a traced Function whose
forward returns a tensor that is also one of its intermediates: an op that
returns its input itself (``x.to(x.dtype)``, ``x.contiguous()`` of a contiguous
``x``) at the end of the forward gives zero gradients, silently. This is what
made early releases keep the fused path out of compiled graphs (its forward
ended in ``out.to(query.dtype)``); the fused path now runs as registered
operators, which dynamo does not trace into. The census below makes every
Function in the package declare how it meets the compiler, and the traced ones
are compiled and compared with eager here (run on torch 2.11 too: the GPU
machine's torch is 2.11)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import dilated_attention_pytorch

from .conftest import assert_close


def _package_functions() -> set[str]:
    found = set()
    for info in pkgutil.walk_packages(dilated_attention_pytorch.__path__, "dilated_attention_pytorch."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra (transformers) not installed: it defines none
            continue
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, torch.autograd.Function)
                and obj.__module__ == info.name
            ):
                found.add(f"{info.name}.{name}")
    return found


def _permute_call() -> tuple[torch.Tensor, object]:
    from dilated_attention_pytorch.core.varlen import _Permute

    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    inverse = torch.argsort(order)
    return x, lambda x: _Permute.apply(x, order, inverse) * torch.arange(7.0, dtype=x.dtype)[:, None, None]


#: Functions dynamo traces: name -> (input, call) to compile and compare with eager
TRACED = {"dilated_attention_pytorch.core.varlen._Permute": _permute_call}
#: Functions that never enter a compiled graph, and why
EAGER_ONLY = {
    "dilated_attention_pytorch.core.unbind._Unbind": (
        "unbind() takes the plain x.unbind(dim) while torch.compile traces"
    ),
    "dilated_attention_pytorch.core.fused._FusedDilatedAttention": (
        "torch.compiler.disable (its exchanges are communication)"
    ),
    "dilated_attention_pytorch.distributed.all_gather.GatherRowsFunction": (
        "called only inside the disabled sequence-parallel path"
    ),
    "dilated_attention_pytorch.distributed.ulysses._AllToAll": (
        "its forward is a process-group collective: dynamo runs it eagerly"
    ),
}


def test_every_function_declares_how_it_meets_the_compiler():
    found = _package_functions()
    declared = set(TRACED) | set(EAGER_ONLY)
    assert found == declared, (
        f"undeclared: {sorted(found - declared)}; declared but gone: {sorted(declared - found)}"
    )


@pytest.mark.parametrize("name", sorted(TRACED))
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_traced_function_compiles_to_the_eager_gradient(name, backend):
    x, call = TRACED[name]()
    grad = torch.randn_like(x)
    expected = call(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    torch._dynamo.reset()
    out = torch.compile(call, backend=backend, fullgraph=True)(x)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    assert_close(out, expected, torch.float64, "compiled output")
    assert_close(out_grad, expected_grad, torch.float64, "compiled gradient")


class _ReturnsItsIntermediate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out = x * 3
        return out.contiguous()  # `out` itself: the pattern torch 2.11 mis-compiles

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * 3


def _torch_drops_the_gradient() -> bool:
    return torch.__version__.startswith("2.11.")


def test_the_torch_behaviour_the_census_guards_against():
    """Pins the mechanism: on torch 2.11 the compiled gradient of such a Function
    is zero; 2.12 and 2.13 return 3 (all three measured)."""
    x = torch.randn(2, 5, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(_ReturnsItsIntermediate.apply, backend="eager", fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    expected = 0.0 if _torch_drops_the_gradient() else 3.0
    assert torch.equal(grad, torch.full_like(grad, expected)), (torch.__version__, grad)
