"""A Hugging Face Llama trained and generating with ``attn_implementation="dilated"``
against ``"sdpa"``, same weights, same run.

Training: tokens/s and peak memory of one step (forward, loss over every
token, backward; bf16 weights; batch 1) per sequence length, CUDA events after
a warm-up, median of ``--repeats``. Dense attention is skipped at lengths after
one that took longer than ``--sdpa-budget-s`` per step; both stop at the first
out-of-memory. Generation: greedy decoding tokens/s after a ``--context``
prompt (the decode steps' time: a run of ``--new-tokens`` minus a run of one),
the median time of one cached forward of one token (no generate loop), and the
bytes of the key/value cache per token of context.

python benchmarks/hf_models.py --device cuda --lengths 16384 65536 262144 524288 1048576 \\
    --context 32768 --output hf_models.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer

from dilated_attention_pytorch.integrations import transformers as dilated_hf

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("needs transformers: pip install 'torch-dilated-attention[hf]'")

#: a ~100M-parameter Llama (tied embeddings), grouped-query heads
LLAMA_100M = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1 << 21,
    tie_word_embeddings=True, rope_theta=500000.0,
)  # fmt: skip
SEGMENT_LENGTHS = [2048, 4096, 8192, 16384]
DILATION_RATES = [1, 2, 4, 8]


def build(attn: str, device: torch.device, dtype: torch.dtype, config: dict) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**config), attn_implementation="sdpa", dtype=dtype
    ).to(device)
    if attn == "dilated":
        dilated_hf.set_dilated_attention(
            model, SEGMENT_LENGTHS, DILATION_RATES, detect_packed_sequences=False
        )
    return model


def train_step(model: transformers.LlamaForCausalLM, n: int, device: torch.device, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ms = Timer(device, warmup=1, repeats=repeats)(step)
        row = {"step_ms": ms, "tokens_per_s": n / ms * 1e3}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return row
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        model.zero_grad(set_to_none=True)


def generation(
    model: transformers.LlamaForCausalLM,
    context: int,
    new_tokens: int,
    device: torch.device,
    constant_cache: bool = False,
) -> dict:
    """Greedy decoding after a ``context`` prompt, with the default cache or
    (``constant_cache``) :class:`DilatedCache`."""
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, "min_new_tokens": 0}

    def new_cache() -> transformers.Cache | None:
        return dilated_hf.DilatedCache(model.config) if constant_cache else None

    def run(count: int) -> tuple[float, object]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=count,
            return_dict_in_generate=True,
            **dilated_hf.cache_kwargs(new_cache()),
            **kw,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    with torch.no_grad():
        run(2)  # warm-up
        prefill_s, _ = run(1)
        total_s, out = run(new_tokens)
        step_ms = decode_step_ms(model, ids, new_tokens, device, new_cache())
    cache = dilated_hf.output_cache(out)
    if constant_cache:
        cache_bytes = cache.nbytes()
    else:
        cache_bytes = sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
        )
    decode_s = total_s - prefill_s
    return {
        "context": context,
        "new_tokens": new_tokens,
        "cache": "DilatedCache" if constant_cache else "DynamicCache",
        "prefill_s": prefill_s,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "decode_forward_ms": step_ms,
        "cache_bytes": cache_bytes,
        "cache_bytes_per_context_token": cache_bytes / (context + new_tokens),
    }


def decode_step_ms(
    model: transformers.LlamaForCausalLM,
    ids: torch.Tensor,
    steps: int,
    device: torch.device,
    cache: transformers.Cache | None = None,
) -> float:
    """Median time of one cached forward of one token (no sampling, no generate loop)."""
    out = model(ids, use_cache=True, **dilated_hf.cache_kwargs(cache))
    state = {"cache": dilated_hf.output_cache(out), "token": out.logits[:, -1:].argmax(-1)}

    def step() -> None:  # each step decodes the previous one's token
        out = model(state["token"], **dilated_hf.cache_kwargs(state["cache"]), use_cache=True)
        state["cache"], state["token"] = dilated_hf.output_cache(out), out.logits[:, -1:].argmax(-1)

    return Timer(device, warmup=1, repeats=max(1, steps - 1))(step)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="*", default=[16384, 65536, 262144])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdpa-budget-s", type=float, default=15.0)
    parser.add_argument("--small", action="store_true", help="a tiny config (CPU smoke run)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each layer in the backward"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(LLAMA_100M)
    if args.small:
        config.update(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": config,
        "pattern": {"segment_lengths": SEGMENT_LENGTHS, "dilation_rates": DILATION_RATES},
        "dtype": str(dtype),
        "train": [],
    }
    models = {name: build(name, device, dtype, config) for name in ("dilated", "sdpa")}
    result["parameters"] = sum(p.numel() for p in models["sdpa"].parameters())
    result["gradient_checkpointing"] = args.gradient_checkpointing
    if args.gradient_checkpointing:
        for model in models.values():
            # renamed in transformers 5.24; the old name warns there
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
    stopped = {"dilated": None, "sdpa": None}
    for n in args.lengths:
        row: dict = {"seq_len": n}
        for name, model in models.items():
            if stopped[name]:
                row[name] = {"skipped": stopped[name]}
                continue
            row[name] = train_step(model, n, device, args.repeats)
            if row[name].get("oom"):
                stopped[name] = f"out of memory at {n}"
            elif name == "sdpa" and row[name]["step_ms"] > 1e3 * args.sdpa_budget_s:
                stopped[name] = f"the step at {n} took longer than {args.sdpa_budget_s} s"
        if "step_ms" in row["dilated"] and "step_ms" in row["sdpa"]:
            row["speedup"] = row["sdpa"]["step_ms"] / row["dilated"]["step_ms"]
        result["train"].append(row)
        print(json.dumps(row), flush=True)
    if args.context:
        result["generate"] = {
            name: generation(m, args.context, args.new_tokens, device) for name, m in models.items()
        }
        result["generate"]["dilated_constant_cache"] = generation(
            models["dilated"], args.context, args.new_tokens, device, constant_cache=True
        )
        print(json.dumps(result["generate"]), flush=True)
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
