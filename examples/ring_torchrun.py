"""Sequence parallelism with torchrun: each rank holds a slice of one long sequence.

    torchrun --nproc_per_node 2 examples/ring_torchrun.py            # CPU (gloo)
    torchrun --nproc_per_node 2 examples/ring_torchrun.py --cuda     # one GPU per rank (NCCL)

Rank 0 checks the result against the single-device module on the whole sequence.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from dilated_attention_pytorch import MultiheadDilatedAttention, RingMultiheadDilatedAttention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    kw = {
        "batch_first": True,
        "segment_lengths": [512, 1024, 4096],
        "dilation_rates": [1, 2, 4],
        "device": device,
    }
    torch.manual_seed(0)  # the same weights on every rank (or load one checkpoint everywhere)
    attn = RingMultiheadDilatedAttention(256, 8, **kw)

    # every rank builds the same sequence here only to check the result;
    # in training each rank loads just its slice: positions [rank*n/P, (rank+1)*n/P)
    x = torch.randn(2, args.seq, 256, device=device, generator=torch.Generator(device).manual_seed(1))
    shard = args.seq // world
    x_local = x[:, rank * shard : (rank + 1) * shard]
    out_local, _ = attn(x_local, x_local, x_local, is_causal=True)
    out_local.square().mean().backward()  # parameter grads: all-reduce them, as DDP/FSDP do

    parts = [torch.empty_like(out_local) for _ in range(world)]
    dist.all_gather(parts, out_local.detach().contiguous())
    if rank == 0:
        single = MultiheadDilatedAttention(256, 8, **kw)
        single.load_state_dict(attn.state_dict())
        expected, _ = single(x, x, x, is_causal=True)
        error = (torch.cat(parts, 1) - expected).abs().max().item()
        print(f"{world} ranks, seq {args.seq}: max |ring - single device| = {error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
