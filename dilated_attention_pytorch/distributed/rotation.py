"""Exchange ``"ring"``: a spanning segment's rows rotate among its members with
``batch_isend_irecv``, one member's block at a time; the backward rotates them
again with their key/value gradients."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import accumulation_dtype
from ..core.blockwise import BlockBackward, accumulate
from ..core.exchange import Balance, Blocks, waiter
from .all_gather import GatheredRows


@dataclasses.dataclass
class RotatingRows:
    """The selected rows of one segment, rotated among its members with
    ``batch_isend_irecv`` (a :class:`~..core.exchange.KeyExchange`): at step
    ``t`` this rank holds member ``(index - t) % size``'s rows, so it holds two
    blocks at a time instead of the whole segment's. ``rows`` gathers what is
    small enough to gather whole (the key padding)."""

    rows: GatheredRows
    group: dist.ProcessGroup | None
    peers: list[int]  # global ranks of the members, in sequence order
    tag: int  # tells the exchanges apart (gloo matches by tag): 4·tag + channel
    balance: Balance | None = None

    @property
    def index(self) -> int:
        return self.rows.index

    @property
    def counts(self) -> list[int]:
        return self.rows.counts

    @property
    def positions(self) -> Tensor:
        return self.rows.positions

    def gather(self, local: Tensor) -> Tensor:
        return self.rows.gather(local)

    def reduce(self, grad: Tensor) -> Tensor:
        return self.rows.reduce(grad)

    def start_forward(self, k: Tensor, v: Tensor) -> Callable[[], tuple[Blocks, tuple[Tensor, Tensor]]]:
        return lambda: (ring_blocks(self, k, v), (k, v))

    def backward(self, block: BlockBackward, k: Tensor, v: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
        grads = ring_backward(self, block, k, v)
        return lambda: grads

    def start_shift(self, tensors: list[Tensor], member: int, channel: int = 0) -> Callable[[], list[Tensor]]:
        """Send ``tensors`` ``(batch, heads, counts[member], ...)`` (``member``'s rows)
        to the next member; ``wait`` returns the previous member's, of member
        ``member - 1``. Shifts on different channels (0 or 1) may be in flight at once."""
        size = len(self.peers)
        after, before = self.peers[(self.index + 1) % size], self.peers[(self.index - 1) % size]
        rows = self.counts[(member - 1) % size]
        incoming = [x.new_empty(*x.shape[:2], rows, *x.shape[3:]) for x in tensors]
        tag = 4 * self.tag + channel
        ops = [dist.P2POp(dist.isend, x.contiguous(), after, self.group, tag) for x in tensors]
        ops += [dist.P2POp(dist.irecv, x, before, self.group, tag) for x in incoming]
        return waiter(dist.batch_isend_irecv(ops), lambda: incoming)


def ring_blocks(ring: RotatingRows, k: Tensor, v: Tensor) -> Blocks:
    """``(members, keys, values)``, one member's block at a time as they come
    round; the next block travels while the caller computes on this one."""
    size = len(ring.counts)
    for t in range(size):
        member = (ring.index - t) % size
        wait = ring.start_shift([k, v], member) if t < size - 1 else None
        yield range(member, member + 1), k, v
        if wait is not None:
            k, v = wait()


def ring_backward(ring: RotatingRows, block: BlockBackward, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The keys rotate again (no other rank's rows were kept); each block's
    key/value gradients travel with it and reach their owner after the last step."""
    incoming: Callable[[], list[Tensor]] | None = None
    for members, k_block, v_block in ring_blocks(ring, k, v):
        block_grads = block(members, k_block, v_block)
        received = incoming() if incoming is not None else None  # the earlier members' share
        grads: Sequence[Tensor]
        if block_grads is None:
            grads = (
                received if received is not None else (torch.zeros_like(k_block), torch.zeros_like(v_block))
            )
        else:  # summed in float32, sent in the input dtype
            summed: Sequence[Tensor] = block_grads
            if received is not None:
                acc = accumulation_dtype(k.dtype)
                summed = tuple(accumulate(g, r, acc) for g, r in zip(block_grads, received))
            grads = tuple(g.to(k.dtype) for g in summed)
        incoming = ring.start_shift(list(grads), members.start, channel=1)
    assert incoming is not None
    dk, dv = incoming()  # this rank's own rows, summed over every member
    return dk, dv
