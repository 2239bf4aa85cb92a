"""Exchange ``"all_gather"`` (LongNet's): every member of a spanning segment sends
its selected rows to the others, point to point; the backward sums each
member's share of the gradients back on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.blockwise import BlockBackward
from ..core.exchange import Balance, Blocks, waiter
from ..core.fused import functorch_active


@dataclasses.dataclass
class GatheredRows:
    """The selected rows of one segment, spread over the ranks that share it
    (a :class:`~..core.exchange.KeyExchange`): each member sends its rows to
    every other member point to point, on the caller's group, and the fused
    path runs all members' keys as one block. No subgroup is
    made: creating groups of some ranks only (``new_group(...,
    use_local_synchronization=True)``) names them by a per-rank counter, and
    ranks that had made different numbers of groups hung forever."""

    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    index: int  # this rank's place among the members
    counts: list[int]  # selected rows per member, in sequence order
    positions: Tensor  # sequence positions of the gathered rows
    tag: int  # tells the exchanges of different segments apart (gloo matches by tag): 4·tag + 3
    balance: Balance | None = None

    def _post(self, outgoing: dict[int, Tensor], incoming: dict[int, Tensor]) -> list[Any]:
        tag = 4 * self.tag + 3
        ops = [dist.P2POp(dist.isend, t, self.peers[j], self.group, tag) for j, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[j], self.group, tag) for j, t in incoming.items()]
        return dist.batch_isend_irecv(ops) if ops else []

    def _others(self) -> list[int]:
        return [j for j in range(len(self.counts)) if j != self.index]

    def start_gather(self, local: Tensor) -> Callable[[], Tensor]:
        local = local.contiguous()
        rest = local.shape[2:]
        # a member with no rows sends nothing, and the others know it from counts
        outgoing = {j: local for j in self._others()} if local.shape[1] else {}
        incoming = {j: local.new_empty(local.shape[0], self.counts[j], *rest) for j in self._others()
                    if self.counts[j]}  # fmt: skip
        works = self._post(outgoing, incoming)

        def rows() -> Tensor:
            parts = [local if j == self.index else incoming.get(j) for j in range(len(self.counts))]
            return torch.cat([p for p in parts if p is not None], 1)

        return waiter(works, rows)

    def start_reduce(self, grad: Tensor) -> Callable[[], Tensor]:
        pieces = grad.split(self.counts, dim=1)
        mine = self.counts[self.index]
        outgoing = {j: pieces[j].contiguous() for j in self._others() if self.counts[j]}
        shape = (grad.shape[0], mine, *grad.shape[2:])
        incoming = {j: grad.new_empty(shape) for j in self._others()} if mine else {}
        works = self._post(outgoing, incoming)

        def summed() -> Tensor:
            total = pieces[self.index].clone()
            for j in sorted(incoming):  # one order on every run: reproducible sums
                total += incoming[j]
            return total

        return waiter(works, summed)

    def gather(self, local: Tensor) -> Tensor:
        return self.start_gather(local)()

    def reduce(self, grad: Tensor) -> Tensor:
        return self.start_reduce(grad)()

    def start_forward(self, k: Tensor, v: Tensor) -> Callable[[], tuple[Blocks, tuple[Tensor, Tensor]]]:
        # keys and values in one message: (batch, count, 2·heads, d)
        wait = self.start_gather(torch.cat([k.transpose(1, 2), v.transpose(1, 2)], 2))

        def blocks() -> tuple[Blocks, tuple[Tensor, Tensor]]:
            k_all, v_all = (x.transpose(1, 2) for x in wait().chunk(2, dim=2))
            return iter([(range(len(self.counts)), k_all, v_all)]), (k_all, v_all)

        return blocks

    def backward(self, block: BlockBackward, k: Tensor, v: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
        grads = block(range(len(self.counts)), k, v) or (torch.zeros_like(k), torch.zeros_like(v))
        wait = self.start_reduce(torch.cat([g.to(k.dtype).transpose(1, 2) for g in grads], 2))

        def own() -> tuple[Tensor, Tensor]:
            dk, dv = (x.transpose(1, 2) for x in wait().chunk(2, dim=2))
            return dk, dv

        return own


class GatherRowsFunction(torch.autograd.Function):
    """:meth:`GatheredRows.gather` under autograd; backward sums gradients home."""

    @staticmethod
    def forward(ctx, local: Tensor, keys: GatheredRows) -> Tensor:  # type: ignore[override]
        ctx.keys = keys
        return keys.gather(local)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if torch.is_grad_enabled() or functorch_active(grad):
            # the reduction is communication, not differentiable ops: a silent zero otherwise
            raise RuntimeError(
                "double backward (create_graph=True) and batched gradients are not supported through "
                "sequence-parallel dilated attention: its keys come from other ranks"
            )
        return ctx.keys.reduce(grad.contiguous()), None


def all_gather_cat(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's ``x`` (same shape on all) concatenated along ``dim`` in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)
