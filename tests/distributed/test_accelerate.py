"""Accelerate's parallelism config (``ParallelismConfig(dp_shard_size=..., cp_size=...)``)
builds the DeviceMesh; its "cp" dimension is the sequence group of the native
strategies (Accelerate's own context parallelism is torch's, which cannot see
the dilated operators). Four gloo ranks: data-shard x sequence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dilated_attention_pytorch import DilatedPattern
from dilated_attention_pytorch.distributed import ring_dilated_attention
from dilated_attention_pytorch.reference import dilated_attention_reference as reference

from ..conftest import TOLERANCES, relative_error
from .spawn import init, spawn

pytest.importorskip("accelerate")


def _run(rank: int, world: int, init_file: str, results: dict) -> None:
    from accelerate import ParallelismConfig

    init(rank, world, init_file)
    try:
        mesh = ParallelismConfig(dp_shard_size=2, cp_size=2).build_device_mesh("cpu")
        assert mesh.mesh_dim_names == ("dp_shard", "cp")
        data, position = mesh["dp_shard"].get_local_rank(), mesh["cp"].get_local_rank()
        gen = torch.Generator().manual_seed(data)  # each data shard its own batch
        q = torch.randn(2, 32, 4, 8, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(2, 32, 2, 8, generator=gen, dtype=torch.float64) for _ in "kv")
        pattern = DilatedPattern((8, 32), (1, 2), "all")
        expected = reference(
            q, k, v, pattern.segment_lengths, pattern.dilation_rates, head_mode="all", is_causal=True
        )
        part = slice(position * 16, (position + 1) * 16)
        errors = []
        for exchange in ("all_gather", "ulysses", "auto"):
            out = ring_dilated_attention(
                *(x[:, part] for x in (q, k, v)), pattern, is_causal=True, exchange=exchange,
                device_mesh=mesh, mesh_dim="cp",
            )  # fmt: skip
            errors.append(relative_error(out, expected[:, part]))
        results[rank] = errors
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four processes
def test_accelerate_mesh_cp_dimension_is_the_sequence_group(tmp_path):
    results = spawn(_run, 4, tmp_path)
    assert len(results) == 4
    for errors in results.values():
        assert max(errors) <= TOLERANCES[torch.float64], errors
