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


class _SequenceModel(torch.nn.Module):
    """Embedding, one dilated attention layer with shared key/value heads, a head:
    on one process, or with the sequence over a mesh dimension (Ulysses)."""

    def __init__(self, mesh=None) -> None:
        from dilated_attention_pytorch import MultiheadDilatedAttention, RingMultiheadDilatedAttention

        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 32)
        kw = {
            "segment_lengths": (4, 8, 16),
            "dilation_rates": (1, 2, 4),
            "head_mode": "all",
            "batch_first": True,
        }
        if mesh is None:
            self.attn = MultiheadDilatedAttention(32, 4, num_kv_heads=2, **kw)
        else:
            self.attn = RingMultiheadDilatedAttention(
                32, 4, num_kv_heads=2, exchange="ulysses", device_mesh=mesh, mesh_dim="sequence", **kw
            )
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.attn(x, x, x, is_causal=True)[0])


def _labels() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _run_2d(rank: int, world: int, init_file: str, results: dict) -> None:
    init(rank, world, init_file)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "sequence"))
        model = _SequenceModel(mesh)
        fsdp.fully_shard(model, mesh=mesh["data"])  # parameters sharded over the data dimension
        d, s = mesh["data"].get_local_rank(), mesh["sequence"].get_local_rank()
        rows, cols = slice(d * BATCH // 2, (d + 1) * BATCH // 2), slice(s * SEQ // 2, (s + 1) * SEQ // 2)
        # SGD: Adam's first step divides by |grad| and turns the key bias's round-off
        # gradient (exactly 0 in exact arithmetic: softmax ignores it) into a full step
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logits = model(_data()[rows, cols])
        loss = F.cross_entropy(logits.flatten(0, 1), _labels()[rows, cols].flatten())
        loss.backward()
        # FSDP averaged the gradients over the data dimension; each sequence rank saw
        # half of every row's tokens: average over the sequence dimension too
        for p in model.parameters():
            local = p.grad.to_local()
            dist.all_reduce(local, group=mesh["sequence"].get_group())
            local.div_(2)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        params = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
        results[rank] = (total.item() / world, params)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four processes
def test_fully_shard_on_data_with_ulysses_on_sequence_equals_one_process(tmp_path) -> None:
    """A 2-D mesh: FSDP2 shards parameters over "data", head-parallel attention
    runs over "sequence"; one training step equals the same step on one process."""
    results = spawn(_run_2d, 4, tmp_path)
    model = _SequenceModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(_data())
    loss = F.cross_entropy(logits.flatten(0, 1), _labels().flatten())
    loss.backward()
    opt.step()
    expected = dict(model.named_parameters())
    for rank in range(4):
        got_loss, params = results[rank]
        assert abs(got_loss - loss.item()) < 1e-5, (got_loss, loss.item())
        for name, value in params.items():
            torch.testing.assert_close(value, expected[name].detach(), atol=1e-5, rtol=1e-4, msg=name)
