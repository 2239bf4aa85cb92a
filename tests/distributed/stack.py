"""A small pre-norm transformer stack for comparing the ring with one device."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, attention_class: type[nn.Module], dim: int, heads: int, **kw) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, dtype=kw.get("dtype"), device=kw.get("device"))
        self.attn = attention_class(dim, heads, batch_first=True, **kw)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim, dtype=kw.get("dtype"), device=kw.get("device")),
            nn.GELU(),
            nn.Linear(2 * dim, dim, dtype=kw.get("dtype"), device=kw.get("device")),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        x = x + self.attn(y, y, y, is_causal=True)[0]
        return x + self.mlp(x)


def stack(
    attention_class: type[nn.Module], layers: int = 8, dim: int = 32, heads: int = 4, **kw
) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and for both stacks
    return nn.Sequential(*(Block(attention_class, dim, heads, **kw) for _ in range(layers)))


def loss_and_grad_norm(model: nn.Module, x: torch.Tensor, numel: int, group=None) -> tuple[float, float]:
    """Mean-square loss over the whole sequence and the global gradient norm.
    With ``group``, ``x`` is this rank's shard; losses and gradients are summed
    over the ranks, as data-parallel training does."""
    loss = model(x).double().square().sum() / numel
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    loss = loss.detach()
    if group is not None:
        dist.all_reduce(grads, group=group)
        dist.all_reduce(loss, group=group)
    return loss.item(), grads.norm().item()
