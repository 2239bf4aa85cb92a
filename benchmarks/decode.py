"""Incremental decoding cost against the context already generated.

For each context length, prefill a LongNetLM with that many tokens, then time
``--steps`` cached decoding steps (CUDA events, median per token) and record
the cache size. The dilated model (LongNet's base pattern) is compared with
the same model on a dense pattern (one segment as long as the longest
context, dilation 1), whose cache is an ordinary full key/value cache.

python benchmarks/decode.py --device cuda --contexts 2048 32768 131072 524288 --output decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilated_attention_pytorch import LongNetLM
from dilated_attention_pytorch.pattern import LONGNET_DILATION_RATES, LONGNET_SEGMENT_LENGTHS


def measure(model: LongNetLM, context: int, steps: int, device: torch.device) -> dict:
    ids = torch.randint(0, model.vocab_size, (1, context), device=device)
    cache = model.new_cache()
    with torch.no_grad():
        logits = model(ids, kv_cache=cache)[:, -1:]
        token = logits.argmax(-1)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                token = model(token, kv_cache=cache).argmax(-1)
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t = time.perf_counter()
                token = model(token, kv_cache=cache).argmax(-1)
                times.append(1000 * (time.perf_counter() - t))
    times = sorted(times[1:])  # the first step allocates nothing new but warms kernels
    return {"context": context, "ms_per_token": times[len(times) // 2], "cache_mib": cache.nbytes() / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 32768, 131072])
    parser.add_argument("--steps", type=int, default=33)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-mode", choices=("grouped", "all"), default="grouped")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    patterns = {
        "dilated": (list(LONGNET_SEGMENT_LENGTHS), list(LONGNET_DILATION_RATES)),
        "dense": ([max(args.contexts) + args.steps + 1], [1]),
    }
    rows = []
    for name, (segments, dilations) in patterns.items():
        torch.manual_seed(0)
        model = LongNetLM(
            256,
            d_model=args.d_model,
            nhead=args.heads,
            num_layers=args.layers,
            dim_feedforward=4 * args.d_model,
            segment_lengths=segments,
            dilation_rates=dilations,
            head_mode=args.head_mode,
            position_embedding="rotary",
            device=device,
            dtype=dtype,
        ).eval()
        for context in args.contexts:
            row = {"pattern": name, **measure(model, context, args.steps, device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
