"""FSDP2 (``fully_shard``) of a LongNetLM on a spawned 2-rank gloo group (CPU):
one data-parallel training step equals the same step on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dilated_attention_pytorch import LongNetLM

from .spawn import init, spawn

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD, BATCH, SEQ, VOCAB = 2, 4, 24, 32


def _model() -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(VOCAB, d_model=32, nhead=4, num_layers=2, dim_feedforward=64,
                     segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), head_mode="all")  # fmt: skip


def _data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    return loss.item()


def _run(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, WORLD, init_file)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in model.layers:
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        shard = BATCH // WORLD
        loss = _step(model, _data()[rank * shard : (rank + 1) * shard])
        total = torch.tensor(loss)
        dist.all_reduce(total)
        params = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
        results[rank] = (total.item() / WORLD, params)
    finally:
        dist.destroy_process_group()


def test_fully_shard_longnet_lm_step_equals_one_process(tmp_path) -> None:
    results = spawn(_run, WORLD, tmp_path)
    model = _model()
    loss = _step(model, _data())
    expected = dict(model.named_parameters())
    for rank in range(WORLD):
        got_loss, params = results[rank]
        assert abs(got_loss - loss) < 1e-5, (got_loss, loss)
        assert params.keys() == expected.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, expected[name].detach(), atol=1e-5, rtol=1e-4, msg=name)
