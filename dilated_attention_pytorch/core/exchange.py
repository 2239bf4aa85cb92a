"""The protocol between the fused path and a sequence-parallel strategy: how a
problem whose keys live on several ranks gets them, block by block, and sends
their gradients home. A strategy is one module of ``distributed/`` implementing it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from .blockwise import BlockBackward

#: ``(members, keys, values)``: one block of keys and values of the members in ``members``,
#: problem layout ``(batch, heads, rows, head_dim)``
Blocks = Iterator[tuple[range, Tensor, Tensor]]


class Balance(Protocol):
    """Causal work of a spanning segment evened out between members ``j`` and
    ``size - 1 - j``: under causality a later member's queries see more blocks,
    so the later one (the lender) hands its last ``rows`` query rows, from row
    ``first`` on, to the earlier one (the borrower), which computes them and
    sends their results back (zigzag balancing without moving the shards)."""

    lender: bool
    partner: int  # the other member's place among the members
    first: int  # first lent row of the lender's block
    rows: int  # lent rows

    def start_swap(self, outgoing: list[Tensor], incoming: list[Tensor]) -> Callable[[], list[Tensor]]:
        """Send ``outgoing`` to the partner and receive into ``incoming`` (allocated by the caller)."""
        ...


class KeyExchange(Protocol):
    """Keys and values of one segment spread over the ranks that share it (its
    members), in blocks of rows, one per member, in sequence order.

    The fused path calls :meth:`start_forward` for every spanning problem before
    it runs the local ones (so communication hides behind them), iterates the
    blocks it returns, and in the backward hands :meth:`backward` the problem's
    :class:`~.blockwise.BlockBackward`. The autograd paths (gather, FlexAttention)
    use :meth:`gather` and :meth:`reduce`.
    """

    index: int  # this rank's place among the members
    counts: list[int]  # selected rows per member, in sequence order
    positions: Tensor  # sequence positions of every member's rows, in sequence order
    balance: Balance | None  # causal load balancing with a partner member, if any

    def gather(self, local: Tensor) -> Tensor:
        """This rank's rows ``(batch, count, ...)`` -> every member's ``(batch, total, ...)``."""
        ...

    def reduce(self, grad: Tensor) -> Tensor:
        """Gradient of :meth:`gather`'s result -> this rank's rows, summed over the members."""
        ...

    def start_forward(self, k: Tensor, v: Tensor) -> Callable[[], tuple[Blocks, tuple[Tensor, Tensor]]]:
        """Start bringing the keys together from this rank's ``k``, ``v`` (problem
        layout); the returned function gives the blocks to run and the keys and
        values the backward will be handed."""
        ...

    def backward(self, block: BlockBackward, k: Tensor, v: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
        """Run ``block`` over every member's keys (``k``, ``v`` as :meth:`start_forward`
        returned them); the returned function gives this rank's own ``(dk, dv)``,
        problem layout, summed over the members."""
        ...


def waiter(works: list[Any], result: Callable[[], Any]) -> Callable[[], Any]:
    """A function that waits for ``works`` (collectives in flight), then returns ``result()``."""

    def wait() -> Any:
        for work in works:
            work.wait()
        return result()

    return wait
