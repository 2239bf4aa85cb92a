"""The checks of a sequence-parallel call: its exchange, its geometry, and the one
collective that makes every rank agree on the call before any other."""

from __future__ import annotations

import zlib
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ..pattern import DilatedPattern

Exchange = Literal["all_gather", "ring", "ulysses", "auto"]


EXCHANGES: tuple[str, ...] = ("all_gather", "ring", "ulysses", "auto")


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a small tensor for a collective on ``group`` lives (NCCL: the current GPU)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def layout_checksum(layout: Tensor) -> Tensor:
    """One int64 that differs, with near certainty, between two different layouts."""
    flat = layout.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 1_000_003
    return (flat * weights).sum().view(1) + flat.numel() * 1_000_003


def check_call(
    query: Tensor,
    group: dist.ProcessGroup | None,
    description: dict[str, Any] | None = None,
    error: Exception | None = None,
    layout: Tensor | None = None,
) -> None:
    """The one check that every rank makes the same call, before any other collective.

    One all-gather of: whether this rank's own arguments were valid (``error``:
    the exception its local checks raised), its shard shape, a fingerprint of
    ``description`` (pattern, dtype, masks present, ...) and of ``layout``. Any
    difference raises on every rank, so no rank waits for a partner that will
    never come: the rank whose arguments were invalid raises its own error, the
    others say which rank it was.
    """
    valid = error is None and isinstance(query, Tensor) and query.dim() == 4
    shape = list(query.shape) if valid else [0, 0, 0, 0]
    fingerprint = zlib.crc32(repr(sorted((description or {}).items())).encode())
    device = collective_device(group)
    row = torch.tensor([int(valid), *shape, fingerprint], dtype=torch.int64, device=device)
    checksum = layout_checksum(layout).to(device) if valid and layout is not None else row.new_zeros(1)
    row = torch.cat([row, checksum])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = [r.tolist() for r in rows]
    if error is not None:
        raise error
    refused = [r for r, values in enumerate(table) if not values[0]]
    if refused:
        raise ValueError(
            f"rank(s) {refused} of the process group refused their arguments (the error raised there "
            "says why), so no rank runs this call"
        )
    shapes = sorted({tuple(values[1:5]) for values in table})
    if len(shapes) > 1:
        raise ValueError(
            "every rank must pass a shard of the same shape (batch, seq / world_size, heads, head_dim); "
            f"got {shapes} across the process group"
        )
    if len({values[5] for values in table}) > 1:
        described: list[Any] = [None] * len(table)
        dist.all_gather_object(described, description, group=group)
        keys = sorted({k for d in described for k in (d or {})})
        differ = {k: [(d or {}).get(k) for d in described] for k in keys}
        differ = {k: v for k, v in differ.items() if len({repr(x) for x in v}) > 1}
        raise ValueError(
            "every rank must make the same call; these differ across the ranks (one value per rank): "
            + "; ".join(f"{k}: {v}" for k, v in differ.items())
        )
    if len({values[6] for values in table}) > 1:
        raise ValueError("block_layout must be the same on every rank (the exchange plan is derived from it)")


def check_shards(query: Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank must hold a shard of the same shape; a mismatch raises on every rank."""
    check_call(query, group)


def group_of(process_group: Any, device_mesh: Any, mesh_dim: int | str | None) -> Any:
    """The process group a call runs over: ``process_group``, or dimension
    ``mesh_dim`` of ``device_mesh`` (a ``torch.distributed.device_mesh.DeviceMesh``;
    a 1-D mesh needs no ``mesh_dim``). None: the default group."""
    if device_mesh is None:
        if mesh_dim is not None:
            raise ValueError("mesh_dim needs device_mesh")
        return process_group
    if process_group is not None:
        raise ValueError("pass process_group or device_mesh, not both")
    if not hasattr(device_mesh, "get_group") or not hasattr(device_mesh, "ndim"):
        raise TypeError(
            f"device_mesh must be a torch.distributed DeviceMesh, got {type(device_mesh).__name__}"
        )
    if mesh_dim is None:
        if device_mesh.ndim != 1:
            raise ValueError(
                f"device_mesh has {device_mesh.ndim} dimensions: name the sequence-parallel one with mesh_dim"
            )
        return device_mesh.get_group()
    return device_mesh.get_group(mesh_dim)


def check_exchange(exchange: str) -> Exchange:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return exchange  # type: ignore[return-value]


def check_geometry(pattern: DilatedPattern, seq: int, shard: int) -> None:
    for i, w in enumerate(pattern.segment_lengths):
        w_eff = min(w, seq)
        if shard % w_eff and w_eff % shard:
            raise ValueError(
                f"segment_lengths[{i}]={w} (effective {w_eff} for seq {seq}) must divide the shard "
                f"length {shard} or be a multiple of it, so segments align with shards"
            )


def describe_call(
    query: Any,
    key: Any,
    value: Any,
    pattern: Any,
    is_causal: Any,
    key_padding_mask: Any,
    dropout_p: Any,
    softmax_scale: Any,
    method: Any,
    has_layout: bool,
    block_size: Any,
    exchange: Any,
) -> dict[str, Any]:
    """What every rank's call must agree on, as plain values (for :func:`check_call`)."""
    tensors = [x for x in (query, key, value) if isinstance(x, Tensor)]
    return {
        "pattern": repr(pattern),
        "dtype": str(query.dtype) if isinstance(query, Tensor) else None,
        "key_shape": tuple(key.shape) if isinstance(key, Tensor) else None,
        "is_causal": is_causal,
        "key_padding_mask": key_padding_mask is not None,
        "dropout_p": dropout_p,
        "softmax_scale": softmax_scale,
        "method": method,
        "exchange": exchange,
        "block_layout": has_layout,
        "block_size": block_size if has_layout else None,
        "requires_grad": torch.is_grad_enabled() and any(x.requires_grad for x in tensors),
    }
