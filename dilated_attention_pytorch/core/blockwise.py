"""Problems whose keys live on several ranks, run block by block, one block per
member: the causal pieces of each block, the lse merge over blocks and the
backward of one block (the schedule every sequence-parallel exchange runs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from .bias import rows_with_keys, sanitize
from .exchange import Blocks, KeyExchange
from .merge import merge_finish, merge_online

if TYPE_CHECKING:
    from .fused import FusedProblem


def shared_kv(kernel_shares: bool, k: Tensor, v: Tensor, group: int) -> tuple[Tensor, Tensor, int]:
    """``(k, v, group)`` for a kernel: key/value problems ``(batch, kv_heads, len, d)``
    read by ``group`` consecutive query heads each, repeated per query head only
    where the kernel does not take them shared (``kernel_shares``: its
    ``SUPPORTS_GQA``), and then ``group`` query heads' gradients sum into each
    (:func:`kv_grads`; else 1)."""
    if group == 1 or kernel_shares:
        return k, v, 1
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), group


def kv_grads(grads: Sequence[Tensor], group: int) -> list[Tensor]:
    """dk, dv per key/value head: summed over the ``group`` query heads of each."""
    return [x if group == 1 else x.unflatten(1, (-1, group)).sum(2) for x in grads]


def _block_columns(span: KeyExchange, members: range) -> slice:
    """Columns of ``members``' rows among all members' (sequence order)."""
    return slice(sum(span.counts[: members.start]), sum(span.counts[: members.stop]))


@dataclasses.dataclass
class _Rows:
    """Query rows ``[first, first + n)`` of ``owner``'s block, with what their
    backward needs once known."""

    owner: int
    first: int
    q: Tensor
    grad_out: Tensor | None = None
    out: Tensor | None = None
    lse: Tensor | None = None


def _pieces(p: FusedProblem, rows: _Rows, members: range) -> list[tuple[slice, Tensor | None, bool]]:
    """``(keys of the block, bias, causal)`` of each kernel call of ``rows`` against
    the block of ``members``' keys: one call without causality; under it, the
    keys up to row ``first`` of ``owner`` in full and the owner's next ``n``
    causally. Causal calls are square, so no kernel's alignment of a
    non-square causal mask matters."""
    span = p.exchange
    assert span is not None
    n = rows.q.shape[2]
    cols = _block_columns(span, members)
    if n == 0 or (p.causal and rows.owner < members.start):
        return []
    keys = [(slice(0, cols.stop - cols.start), False)]
    if p.causal and rows.owner < members.stop:
        own = _block_columns(span, range(members.start, rows.owner)).stop - cols.start + rows.first
        keys = [(slice(0, own), False)] if own else []
        keys.append((slice(own, own + n), True))
    bias = None if p.bias is None else p.bias[..., cols]
    return [(k, None if bias is None else bias[..., k], causal) for k, causal in keys]


def accumulate(total: Tensor | None, part: Tensor, dtype: torch.dtype) -> Tensor:
    """``total + part``, in ``dtype`` once there are two terms."""
    if total is None:
        return part
    return total.to(dtype).add_(part)


def _query_rows(p: FusedProblem, q: Tensor) -> list[_Rows]:
    """This rank's rows to compute: its own, less what it lends, plus what it borrows."""
    span = p.exchange
    assert span is not None
    bal = span.balance
    if bal is None:
        return [_Rows(span.index, 0, q)]
    if bal.lender:
        bal.start_swap([q[:, :, bal.first :].contiguous()], [])()
        return [_Rows(span.index, 0, q[:, :, : bal.first])]
    borrowed = q.new_empty(*q.shape[:2], bal.rows, q.shape[3])
    bal.start_swap([], [borrowed])()
    return [_Rows(span.index, 0, q), _Rows(bal.partner, bal.first, borrowed)]


def blockwise_forward(
    p: FusedProblem, q: Tensor, blocks: Blocks, scale: float
) -> tuple[Tensor, Tensor, dict[Any, Any]]:
    """One problem over keys in blocks, merged by lse in float32. Returns
    ``(out, lse, kernel states)`` of this rank's own query rows."""
    sets = _query_rows(p, q)
    acc_dtype = accumulation_dtype(q.dtype)
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(sets)
    # from the second call on, a set's results merge online: (acc, top, total)
    merging: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    states: dict[Any, Any] = {"rows": sets}
    for members, k, v in blocks:
        k, v, _ = shared_kv(p.backend.SUPPORTS_GQA, k, v, q.shape[1] // k.shape[1])
        for s, rows in enumerate(sets):
            for piece, (keys, bias, causal) in enumerate(_pieces(p, rows, members)):
                part_out, part_lse, states[s, members.start, piece] = p.backend.forward(
                    rows.q, k[:, :, keys], v[:, :, keys], bias, causal, scale
                )
                if bias is not None:
                    part_out, part_lse = sanitize(part_out, part_lse, rows_with_keys(bias, causal))
                first = results[s]
                if first is None:  # one call (the common case) needs no merge
                    results[s] = part_out, part_lse
                    continue
                if s not in merging:
                    out, lse = first[0].to(acc_dtype), first[1].to(acc_dtype)
                    merging[s] = out.clone(), lse.clone(), (lse > -math.inf).to(acc_dtype)
                merge_online(*merging[s], part_out.to(acc_dtype), part_lse.to(acc_dtype))
    for s, terms in merging.items():
        results[s] = merge_finish(*terms)
    if results[0] is None:  # no key for any row
        results[0] = (
            sets[0].q.new_zeros(sets[0].q.shape),
            sets[0].q.new_full(sets[0].q.shape[:3], -math.inf, dtype=acc_dtype),
        )
    first_result = results[0]
    assert first_result is not None
    out, lse = first_result
    bal = p.exchange.balance if p.exchange is not None else None
    if bal is not None and bal.lender:  # the lent rows' results come back, in float32
        shape = (*out.shape[:2], bal.rows)
        incoming = [
            out.new_empty(*shape, out.shape[3], dtype=acc_dtype),
            lse.new_empty(shape, dtype=acc_dtype),
        ]
        lent_out, lent_lse = bal.start_swap([], incoming)()
        out, lse = torch.cat([out.to(acc_dtype), lent_out], 2), torch.cat([lse.to(acc_dtype), lent_lse], 2)
    elif bal is not None:
        assert results[1] is not None  # lent rows always see earlier keys
        bal.start_swap([x.to(acc_dtype).contiguous() for x in results[1]], [])()
    return out, lse, states


@dataclasses.dataclass
class BlockBackward:
    """What every block's backward shares; ``dq`` sums over the blocks in float32."""

    p: FusedProblem
    rows: list[_Rows]
    scale: float
    states: dict[Any, Any]
    dq: list[Tensor | None]

    @classmethod
    def start(
        cls, p: FusedProblem, grad_out: Tensor, out: Tensor, lse: Tensor, scale: float, states: dict[Any, Any]
    ) -> BlockBackward:
        """Own rows get their gradient, output and lse; lent rows' go to the borrower."""
        # copies: rows holding the output in the node's own state would make a reference cycle
        rows: list[_Rows] = [dataclasses.replace(r) for r in states["rows"]]
        bal = p.exchange.balance if p.exchange is not None else None
        own = slice(0, bal.first) if bal is not None and bal.lender else slice(None)
        rows[0].grad_out, rows[0].out, rows[0].lse = grad_out[:, :, own], out[:, :, own], lse[:, :, own]
        if bal is not None and bal.lender:
            bal.start_swap([x[:, :, bal.first :].contiguous() for x in (grad_out, out, lse)], [])()
        elif bal is not None:
            lent = rows[1]
            shape = (*lent.q.shape[:2], bal.rows)
            lent.grad_out, lent.out, lent.lse = bal.start_swap(
                [], [grad_out.new_empty(*shape, grad_out.shape[3]), out.new_empty(*shape, out.shape[3]),
                     lse.new_empty(shape)],
            )()  # fmt: skip
        return cls(p, rows, scale, states, [None] * len(rows))

    def __call__(self, members: range, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(dk, dv)`` of the block of ``members``' keys ``(batch, kv_heads, rows, d)``,
        None where no query sees it."""
        acc = accumulation_dtype(k.dtype)
        grads: list[Tensor] | None = None
        k, v, group = shared_kv(self.p.backend.SUPPORTS_GQA, k, v, self.rows[0].q.shape[1] // k.shape[1])
        for s, rows in enumerate(self.rows):
            assert rows.grad_out is not None and rows.out is not None and rows.lse is not None
            for piece, (keys, bias, causal) in enumerate(_pieces(self.p, rows, members)):
                dq, dk, dv = self.p.backend.backward(
                    rows.grad_out, rows.q, k[:, :, keys], v[:, :, keys], rows.out, rows.lse,
                    bias, causal, self.scale, self.states[s, members.start, piece],
                )  # fmt: skip
                self.dq[s] = accumulate(self.dq[s], dq, acc)
                if grads is None and dk.shape == k.shape:  # one call over the whole block
                    grads = [dk, dv]
                    continue
                if grads is None:
                    grads = [k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)]
                elif grads[0].dtype != acc:
                    grads = [x.to(acc) for x in grads]
                grads[0][:, :, keys] += dk
                grads[1][:, :, keys] += dv
        if grads is None:
            return None
        dk, dv = kv_grads(grads, group)
        return dk, dv

    def finish(self) -> Tensor:
        """``dq`` of this rank's rows; the borrower's share of the lent rows comes home."""
        acc = accumulation_dtype(self.rows[0].q.dtype)
        dq = [x if x is not None else r.q.new_zeros(r.q.shape) for x, r in zip(self.dq, self.rows)]
        bal = self.p.exchange.balance if self.p.exchange is not None else None
        if bal is None:
            return dq[0]
        if not bal.lender:
            bal.start_swap([dq[1].to(acc).contiguous()], [])()
            return dq[0]
        (lent,) = bal.start_swap(
            [], [dq[0].new_empty(*dq[0].shape[:2], bal.rows, dq[0].shape[3], dtype=acc)]
        )()
        return torch.cat([dq[0].to(acc), lent], 2)
