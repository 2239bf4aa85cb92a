"""Block-sparse exchange: a member receives from another only the selected rows
whose blocks some of its queries may see, point to point, by a plan every
member derives from the layout."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from ..pattern import BranchCall
from ..sparse.block_layout import BlockLayout
from ..sparse.block_mask import BlockMaskCache, call_layout

#: exchange plans of block-sparse spans, keyed by layout and geometry
PLANS = BlockMaskCache()


@dataclasses.dataclass
class SparseRows:
    """The selected rows of one segment that block-sparse queries need, sent point
    to point (:meth:`gather` / :meth:`reduce` of a :class:`~..core.exchange.KeyExchange`,
    on the autograd paths; block layouts never run fused): member ``j`` gets from
    this rank only ``send[j]``, and this rank takes ``recv[j]`` of member ``j``'s
    rows. Every member derives the same plan, so sends and receives pair up;
    ranks with nothing to compute still post theirs."""

    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    index: int  # this rank's place among the members
    count: int  # this rank's selected rows
    send: list[Tensor]  # per member: indices of this rank's rows it needs ([index]: those used here)
    recv: list[Tensor]  # per member: indices of its rows this rank needs ([index] = send[index])
    positions: Tensor  # sequence positions of the gathered rows, sorted
    tag: int  # tells the exchanges of different segments apart (gloo matches by tag)

    def _exchange(self, outgoing: dict[int, Tensor], incoming: dict[int, Tensor]) -> None:
        ops = [dist.P2POp(dist.isend, t, self.peers[j], self.group, self.tag) for j, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[j], self.group, self.tag) for j, t in incoming.items()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _others(self, index: list[Tensor]) -> list[tuple[int, Tensor]]:
        return [(j, i) for j, i in enumerate(index) if j != self.index and i.numel()]

    def gather(self, local: Tensor) -> Tensor:
        rest = local.shape[2:]
        outgoing = {j: local[:, i].contiguous() for j, i in self._others(self.send)}
        incoming = {j: local.new_empty(local.shape[0], i.numel(), *rest) for j, i in self._others(self.recv)}
        self._exchange(outgoing, incoming)
        parts = [local[:, i] if j == self.index else incoming.get(j) for j, i in enumerate(self.recv)]
        return torch.cat([p for p in parts if p is not None], 1)

    def reduce(self, grad: Tensor) -> Tensor:
        pieces = grad.split([i.numel() for i in self.recv], dim=1)
        outgoing = {j: pieces[j].contiguous() for j, _ in self._others(self.recv)}
        incoming = {
            j: grad.new_empty(grad.shape[0], i.numel(), *grad.shape[2:]) for j, i in self._others(self.send)
        }
        self._exchange(outgoing, incoming)
        mine = grad.new_zeros(grad.shape[0], self.count, *grad.shape[2:])
        mine.index_add_(1, self.recv[self.index], pieces[self.index])
        for j, received in incoming.items():
            mine.index_add_(1, self.send[j], received)
        return mine


def sparse_plan(
    call: BranchCall, positions: list[Tensor], me: int, layout: BlockLayout, causal: bool
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(send, recv, gathered positions) of :class:`SparseRows`, from every member's
    row ``positions`` (in sequence order): a member needs a row of another when
    some block of its queries may see the row's block, for any batch element or
    head of the call, and (causal) the row is not later."""
    device = layout.blocks.device
    members = range(len(positions))
    blocks = call_layout(layout.blocks, call).any(0).any(0)  # (nb, nb)
    sees = [blocks[torch.unique(p // layout.block_size)].any(0) for p in positions]

    def needed(receiver: int, sender: int) -> Tensor:
        if causal and sender > receiver:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.nonzero(sees[receiver][positions[sender] // layout.block_size]).flatten()

    send = [needed(j, me) for j in range(len(members))]
    recv = [needed(me, j) for j in range(len(members))]
    gathered = torch.cat([positions[j][recv[j]] for j in range(len(members))])
    return send, recv, gathered
