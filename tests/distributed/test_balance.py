"""Causal load balancing of spanning segments: the plan evens out each pair."""

from __future__ import annotations

import pytest

from dilated_attention_pytorch.distributed.balance import plan_balance


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_causal_balance_evens_out_pairs(size):
    """Member j's row i sees j·c + i + 1 keys under causality; after lending, the
    two members of each pair do the same work within 1 %, and agree on the plan."""
    c = 1000
    counts = [c] * size
    work = [sum(j * c + i + 1 for i in range(c)) for j in range(size)]
    for me in range(size):
        plan = plan_balance(counts, me, list(range(size)), None, 0)
        partner = size - 1 - me
        if partner == me:
            assert plan is None
            continue
        other = plan_balance(counts, partner, list(range(size)), None, 0)
        assert plan is not None and other is not None
        assert (plan.first, plan.rows, plan.peer) == (other.first, other.rows, partner)
        assert plan.lender == (me > partner) != other.lender
        lender = max(me, partner)
        lent = sum(lender * c + i + 1 for i in range(plan.first, c))
        kept, borrower = work[lender] - lent, work[min(me, partner)] + lent
        assert max(kept, borrower) / min(kept, borrower) < 1.01, (kept, borrower)
