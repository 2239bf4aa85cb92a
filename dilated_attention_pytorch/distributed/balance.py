"""Causal load balancing of a spanning segment: members ``j`` and ``m - 1 - j``
pair up and the later one lends its last query rows to the earlier one."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from ..core.exchange import waiter


@dataclasses.dataclass
class PairBalance:
    """Causal load balancing between two members of a segment (a
    :class:`~..core.exchange.Balance`)."""

    group: dist.ProcessGroup | None
    peer: int  # the partner's global rank
    tag: int  # 4·tag + 2: apart from the ring's channels
    lender: bool
    partner: int
    first: int
    rows: int

    def start_swap(self, outgoing: list[Tensor], incoming: list[Tensor]) -> Callable[[], list[Tensor]]:
        tag = 4 * self.tag + 2
        ops = [dist.P2POp(dist.isend, x, self.peer, self.group, tag) for x in outgoing]
        ops += [dist.P2POp(dist.irecv, x, self.peer, self.group, tag) for x in incoming]
        return waiter(dist.batch_isend_irecv(ops), lambda: incoming)


def plan_balance(
    counts: list[int], me: int, peers: list[int], group: dist.ProcessGroup | None, tag: int
) -> PairBalance | None:
    """Member ``j`` pairs with ``size - 1 - j``. With ``c`` rows per member, the
    later one's row ``i`` sees ``j·c + i`` keys; keeping its first ``a`` rows with
    ``a²/2 + j·c·a = size·c²/2`` leaves both with half the pair's work."""
    size = len(counts)
    partner = size - 1 - me
    if partner == me:
        return None
    j = max(me, partner)
    c = counts[j]
    first = min(max(round(c * (math.sqrt(j * j + size) - j)), 0), c)
    if first == c:
        return None
    return PairBalance(group, peers[partner], tag, me == j, partner, first, c - first)
