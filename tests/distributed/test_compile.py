"""``torch.compile`` of the sequence-parallel multihead module, every exchange, on a
spawned gloo group of 2 ranks: outputs and every parameter's gradient equal
eager. The attention runs eagerly inside the compiled model (its exchanges are
communication); the projections around it are compiled."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch.distributed.checks import EXCHANGES

from ..conftest import TOLERANCES, relative_error
from .spawn import init, spawn


def _run(rank: int, world: int, init_file: str, results: dict) -> None:
    from dilated_attention_pytorch import RingMultiheadDilatedAttention

    init(rank, world, init_file)
    failures = []
    try:
        x = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grad = torch.randn(2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        part = slice(rank * 16, (rank + 1) * 16)
        for exchange in EXCHANGES:
            for backend in ("aot_eager",):  # dynamo and AOT autograd, not inductor's codegen
                torch.manual_seed(0)
                module = RingMultiheadDilatedAttention(
                    16, 4, num_kv_heads=2, exchange=exchange, batch_first=True,
                    segment_lengths=[4, 32], dilation_rates=[1, 4], dtype=torch.float64,
                )  # fmt: skip
                xl = x[:, part]
                eager = module(xl, xl, xl, is_causal=True)[0]
                expected = torch.autograd.grad(eager, list(module.parameters()), grad[:, part])
                torch._dynamo.reset()
                compiled = torch.compile(module, backend=backend)
                out = compiled(xl, xl, xl, is_causal=True)[0]
                grads = torch.autograd.grad(out, list(module.parameters()), grad[:, part])
                errors = [relative_error(out, eager)] + [
                    relative_error(a, b) for a, b in zip(grads, expected)
                ]
                if max(errors) > TOLERANCES[torch.float64]:
                    failures.append((exchange, backend, max(errors)))
    except Exception as e:
        failures.append(repr(e))
    finally:
        results[rank] = failures
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compiled_module_equals_eager_for_every_exchange(tmp_path):
    results = spawn(_run, 2, tmp_path)
    assert sorted(results) == [0, 1]
    assert all(not failures for failures in results.values()), results
