"""Train a Hugging Face Llama with dilated attention on long-range recall.

The model is ``transformers.LlamaForCausalLM`` (built from a small config with
random weights, or loaded from ``--model PATH``, a local checkpoint directory)
with ``attn_implementation="dilated"`` (``--attn dilated``) or PyTorch's SDPA
(``--attn sdpa``). The task is ``examples/train_longnet_lm.py``'s: a value
hidden in the first quarter of the sequence must be recalled at the QUERY
tokens at its end. Chance accuracy is 1/16.

CPU, small (a few minutes)::

    python examples/hf_llama_dilated.py

GPU::

    python examples/hf_llama_dilated.py --device cuda --seq-len 65536 --hidden-size 256 \\
        --layers 4 --segment-lengths 1024 4096 16384 65536 --dilation-rates 1 4 16 64 --steps 300

Writes ``loss.png`` and ``results.json`` to ``--output-dir``; ``--save`` also
writes the trained model (its config keeps the pattern).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_longnet_lm import RecallTask, fit, plot

import dilated_attention_pytorch.integrations.transformers as dilated_hf

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("needs transformers: pip install 'torch-dilated-attention[hf]'")


def build_model(
    args: argparse.Namespace, vocab_size: int, device: torch.device
) -> transformers.PreTrainedModel:
    torch.manual_seed(args.seed)
    if args.model is not None:  # a local checkpoint: no download
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(args.seq_len, 2048),
        )
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    if args.attn == "dilated":
        dilated_hf.set_dilated_attention(
            model, args.segment_lengths, args.dilation_rates, head_mode=args.head_mode
        )
    return model.to(device)


def loss_and_accuracy(model, task: RecallTask, ids: torch.Tensor, answer: torch.Tensor, amp: bool):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(ids, logits_to_keep=task.num_queries).logits.float()
    target = answer[:, None].expand(-1, task.num_queries)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, (logits.argmax(-1) == target).float().mean()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attn", choices=("dilated", "sdpa"), default="dilated")
    parser.add_argument("--model", type=Path, default=None, help="a local checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-queries", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--segment-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--head-mode", choices=("grouped", "all"), default="grouped")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save the trained model to --output-dir/model")
    parser.add_argument("--output-dir", type=Path, default=Path("hf_llama_run"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    needle = max(args.dilation_rates) if args.attn == "dilated" else 1
    task = RecallTask(args.seq_len, args.num_queries, needle)
    model = build_model(args, task.vocab_size, device)
    amp = device.type == "cuda"
    result = fit(model, task, args, device, loss_and_accuracy, amp, f"train ({args.attn})")
    result |= {
        "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    accuracy, chance = result["final_accuracy"], result["chance_accuracy"]
    print(f"{args.attn}: final accuracy {accuracy:.1%} (chance {chance:.1%}) after {args.steps} steps")
    plot(result, args.output_dir / "loss.png", f"Llama ({args.attn})")
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=1))
    if args.save:
        model.save_pretrained(args.output_dir / "model")
    return result


if __name__ == "__main__":
    main()
