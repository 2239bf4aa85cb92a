"""The exactness cases every sequence-parallel strategy runs: each rank's shard of
the output and gradients against the reference on the whole sequence, float64."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.distributed.ulysses import head_parallel_reasons
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, relative_error
from .spawn import init

CASES = [
    (2, 32, (4, 16, 32), (1, 2, 4), 3),  # local, local (w = shard), spanning 2
    (4, 32, (4, 16, 32), (1, 3, 2), 5),  # spanning 2 and 4; r=3 gives shards uneven counts
    (4, 32, (8, 24, 64), (2, 3, 5), 4),  # partial last segment (24 | 8 local), w > seq
    (4, 32, (16,), (6,), 2),  # one branch, r > heads, uneven counts
    (2, 32, (4, 8, 16, 32), (1, 2, 3, 4), 2),  # heads < branches
    (8, 64, (8, 16, 32, 64), (1, 2, 3, 4), 4),  # 8 ranks: local, spanning 2, 4 and 8
    # worlds that are no power of two, and partial last segments spanning ranks: they
    # hung when spanning ranks made their own subgroups
    (3, 24, (4, 16, 32), (1, 2, 4), 3),  # spanning 2 (and a local partial), spanning 3
    (4, 32, (8, 24, 32), (1, 2, 4), 3),  # spanning 3 with a local partial segment, spanning 4
    (5, 40, (8, 24, 16), (1, 3, 2), 4),  # partial [24, 40) spans ranks 3 and 4
    (6, 24, (8, 16, 24), (1, 2, 3), 5),  # spanning 2 and 4, partial [16, 24) spans 4 and 5
]

#: every world size the cases use
WORLDS = sorted({case[0] for case in CASES})


def run_cases(
    rank: int,
    world: int,
    init_file: str,
    results: dict,
    exchanges: list[tuple[str, str]],
    cases: list[tuple] = CASES,
) -> None:
    init(rank, world, init_file)
    try:
        failures = []
        for case_world, seq, seg, dil, heads in cases:
            if case_world != world:
                continue
            shard = seq // world
            for head_mode in ("grouped", "all"):
                for causal in (False, True):
                    # the worlds added for their geometry run with a padding mask only
                    for with_mask in (False, True) if world in (2, 4, 8) else (True,):
                        # the same seed on every rank: each builds the same global tensors
                        g = torch.Generator().manual_seed(
                            zlib.crc32(repr((seq, seg, head_mode, causal)).encode())
                        )
                        # with the mask, even head counts share key/value heads (grouped-query)
                        kv_heads = heads // 2 if with_mask and heads % 2 == 0 else heads
                        q, grad = (
                            torch.randn(2, seq, heads, 4, generator=g, dtype=torch.float64) for _ in "qg"
                        )
                        k, v = (
                            torch.randn(2, seq, kv_heads, 4, generator=g, dtype=torch.float64) for _ in "kv"
                        )
                        kpm = torch.rand(2, seq, generator=g) < 0.25 if with_mask else None
                        for x in (q, k, v):
                            x.requires_grad_()
                        exp = reference(
                            q, k, v, seg, dil, head_mode=head_mode, is_causal=causal, key_padding_mask=kpm
                        )
                        exp_grads = torch.autograd.grad(exp, (q, k, v), grad)
                        part = slice(rank * shard, (rank + 1) * shard)
                        ql, kl, vl = (x.detach()[:, part].clone().requires_grad_() for x in (q, k, v))
                        for method, exchange in exchanges:
                            if exchange == "ulysses" and head_parallel_reasons(heads, kv_heads, world):
                                continue  # heads that do not split over the ranks: test_ulysses.py
                            for x in (ql, kl, vl):
                                x.grad = None
                            out = ring_dilated_attention(
                                ql, kl, vl, DilatedPattern(seg, dil, head_mode), is_causal=causal,
                                key_padding_mask=None if kpm is None else kpm[:, part], method=method,
                                exchange=exchange,
                            )  # fmt: skip
                            out.backward(grad[:, part])
                            errors = [relative_error(out, exp[:, part])]
                            errors += [
                                relative_error(a.grad, b[:, part]) for a, b in zip((ql, kl, vl), exp_grads)
                            ]
                            if not torch.isfinite(out).all() or max(errors) > TOLERANCES[torch.float64]:
                                case = (
                                    method,
                                    exchange,
                                    seq,
                                    seg,
                                    dil,
                                    head_mode,
                                    causal,
                                    with_mask,
                                    kv_heads,
                                )
                                failures.append(f"{case}: {errors}")
        results[rank] = failures
    finally:
        dist.destroy_process_group()


def check_strategy(
    exchanges: list[tuple[str, str]], world: int, tmp_path, cases: list[tuple] = CASES
) -> None:
    """Every case of ``world`` ranks with each ``(method, exchange)``, on fresh processes."""
    import functools

    from .spawn import spawn

    results = spawn(functools.partial(run_cases, exchanges=exchanges, cases=cases), world, tmp_path)
    assert sorted(results) == list(range(world))
    assert all(not failures for failures in results.values()), results
