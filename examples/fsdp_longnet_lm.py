"""Train a LongNetLM with FSDP2 (``fully_shard``) across GPUs, bf16 mixed precision.

torchrun --nproc_per_node 2 examples/fsdp_longnet_lm.py --steps 20 --seq-len 32768

Each rank takes its own batch (data parallel); parameters, gradients and
optimizer state are sharded. Prints the loss per step and the peak memory per
rank. On CPU (gloo) it runs the same loop in float32: ``--device cpu``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dilated_attention_pytorch import LongNetLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = LongNetLM(args.vocab_size, num_layers=args.layers, device=device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(
            device
        )
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.4f}", flush=True)
    if cuda:
        peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        dist.all_gather(peaks, peak)
        if rank == 0:
            print("peak memory per rank (GiB):", [round(p.item(), 2) for p in peaks])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
