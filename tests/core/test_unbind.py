"""``core.unbind.unbind``: autograd's unbind, whose backward passes gradients that
lie as one tensor's slices on without the copy of ``torch.stack``."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dilated_attention_pytorch.core.unbind import unbind


class _Ops(TorchDispatchMode):
    """The aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_values_and_gradients_are_unbinds():
    x = torch.randn(2, 7, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 2, 7, 4, 5, dtype=torch.float64)
    ours, theirs = unbind(x, 2), x.unbind(2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    loss = lambda parts: sum((p * w).sum() for p, w in zip(parts, weights))  # noqa: E731
    (expected,) = torch.autograd.grad(loss(theirs), x)
    (got,) = torch.autograd.grad(loss(ours), x)
    assert torch.equal(got, expected)


def test_stacked_gradients_pass_without_a_copy():
    x = torch.randn(2, 7, 3, 4, 5, requires_grad=True)
    grads = torch.randn(2, 7, 3, 4, 5)
    q, k, v = unbind(x, 2)
    with _Ops() as ops:
        (got,) = torch.autograd.grad((q, k, v), x, grads.unbind(2))
    assert got.data_ptr() == grads.data_ptr() and torch.equal(got, grads)
    assert not {"stack", "cat", "copy_"} & {name.split(".")[0] for name in ops.names}


def test_separate_or_missing_gradients_are_stacked():
    x = torch.randn(2, 7, 3, 4, 5, requires_grad=True)
    separate = [torch.randn(2, 7, 4, 5) for _ in range(3)]
    (got,) = torch.autograd.grad(unbind(x, 2), x, separate)
    assert torch.equal(got, torch.stack(separate, 2))
    q, _, v = unbind(x, 2)  # the keys take no part: a zero gradient
    (got,) = torch.autograd.grad((q * 2).sum() + v.sum(), x)
    assert torch.equal(
        got, torch.stack([torch.full_like(q, 2.0), torch.zeros_like(q), torch.ones_like(q)], 2)
    )
