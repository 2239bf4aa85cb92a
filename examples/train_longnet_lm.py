"""Train a small LongNetLM on long-range recall and compare it with dense attention.

The task: a sequence of random filler tokens hides a *value* (one of 16 value
tokens, written ``--needle-length`` times in a row) somewhere in its first
quarter; the sequence ends with ``--num-queries`` QUERY tokens, and at each of
them the model must output the hidden value. The answer sits at least 3/4 of
the sequence back (thousands of tokens at GPU size). Chance accuracy is 1/16.

A query reads, in a branch with dilation r, only every r-th position (those of
its own residue mod r). With a needle of at least max(dilation_rates) tokens
one copy always lies on a query's residue, so one dilated read finds it. With a
one-token needle most queries must learn a two-hop route (a local branch
spreads the value to neighbours, a dilated branch reads one of them), which
takes far longer to learn: see docs/models.md for what we measured.

CPU, small (a few minutes)::

    python examples/train_longnet_lm.py

GPU, larger, with the dense-attention comparison::

    python examples/train_longnet_lm.py --device cuda --seq-len 16384 --d-model 256 \\
        --layers 4 --segment-lengths 256 1024 4096 16384 --dilation-rates 1 2 4 8 \\
        --steps 1500 --batch-size 8 --compare-dense 16384 65536 262144 1048576

Writes ``loss.png`` and ``results.json`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from dilated_attention_pytorch import LongNetLM


def progress(iterable: Iterable[int], total: int, desc: str) -> Iterator[int]:
    """tqdm when installed, a plain counter otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc)
        return
    for i, item in enumerate(iterable):
        if i % max(1, total // 20) == 0:
            print(f"{desc}: {i}/{total}", flush=True)
        yield item


class RecallTask:
    """Token ids: filler ``[0, num_filler)``, values ``[num_filler, num_filler + num_values)``, QUERY last."""

    def __init__(
        self,
        seq_len: int,
        num_queries: int,
        needle_length: int = 1,
        num_filler: int = 32,
        num_values: int = 16,
    ) -> None:
        if seq_len < 4 * (num_queries + needle_length):
            raise ValueError(f"seq_len must be at least 4 * (num_queries + needle_length), got {seq_len}")
        self.seq_len, self.num_queries, self.needle_length = seq_len, num_queries, needle_length
        self.num_filler, self.num_values = num_filler, num_values
        self.query = num_filler + num_values
        self.vocab_size = self.query + 1

    def batch(
        self, size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (size, seq_len), answers (size,))``."""
        ids = torch.randint(0, self.num_filler, (size, self.seq_len), generator=generator)
        answer = torch.randint(0, self.num_values, (size,), generator=generator) + self.num_filler
        where = torch.randint(0, self.seq_len // 4 - self.needle_length, (size,), generator=generator)
        for i in range(self.needle_length):
            ids[torch.arange(size), where + i] = answer
        ids[:, -self.num_queries :] = self.query
        return ids.to(device), answer.to(device)


def loss_and_accuracy(model: LongNetLM, task: RecallTask, ids: torch.Tensor, answer: torch.Tensor, amp: bool):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(ids)[:, -task.num_queries :].float()
    target = answer[:, None].expand(-1, task.num_queries)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    accuracy = (logits.argmax(-1) == target).float().mean()
    return loss, accuracy


def train(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    needle = args.needle_length if args.needle_length is not None else max(args.dilation_rates)
    task = RecallTask(args.seq_len, args.num_queries, needle)
    model = LongNetLM(
        task.vocab_size,
        d_model=args.d_model,
        nhead=args.heads,
        num_layers=args.layers,
        dim_feedforward=4 * args.d_model,
        segment_lengths=args.segment_lengths,
        dilation_rates=args.dilation_rates,
        head_mode=args.head_mode,
        attention_type=args.attention_type,
        position_embedding=args.position_embedding,
        device=device,
    )
    amp = device.type == "cuda" and not args.fp32
    result = fit(model, task, args, device, loss_and_accuracy, amp, "train")
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def fit(
    model, task: RecallTask, args: argparse.Namespace, device: torch.device, step, amp: bool, desc: str
) -> dict:
    """AdamW with warm-up and cosine decay for ``args.steps`` steps of ``step(model,
    task, ids, answer, amp) -> (loss, accuracy)``, then held-out accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    losses, accuracies = [], []
    model.train()
    start = time.perf_counter()
    for _ in progress(range(args.steps), args.steps, desc):
        ids, answer = task.batch(args.batch_size, generator, device)
        loss, accuracy = step(model, task, ids, answer, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        accuracies.append(accuracy.item())
    train_seconds = time.perf_counter() - start

    model.eval()
    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    correct = []
    with torch.no_grad():
        for _ in range(args.eval_batches):
            ids, answer = task.batch(args.batch_size, held_out, device)
            correct.append(step(model, task, ids, answer, amp)[1].item())
    return {
        "losses": losses,
        "train_accuracies": accuracies,
        "final_accuracy": sum(correct) / len(correct),
        "chance_accuracy": 1 / task.num_values,
        "train_seconds": train_seconds,
    }


def compare_dense(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time one training step (batch 1) of the same model with the dilated pattern
    and with dense causal attention (one segment of n, no dilation: SDPA's fused
    kernels) at each length, until dense runs out of memory or past a time budget.
    Both use rotary positions: xPos over one dense segment of n overflows for large n."""
    results = []
    dense_too_slow = False
    for n in args.compare_dense:
        row: dict = {"seq_len": n}
        for name in ("dilated", "dense"):
            if name == "dense" and dense_too_slow:
                row[name] = {
                    "skipped": f"the previous length took longer than {args.dense_budget_s} s per step"
                }
                continue
            pattern = (args.segment_lengths, args.dilation_rates) if name == "dilated" else ([n], [1])
            row[name] = measure_step(args, device, n, *pattern)
            if name == "dense" and row[name].get("step_ms", 0) > 1000 * args.dense_budget_s:
                dense_too_slow = True
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def measure_step(
    args: argparse.Namespace, device: torch.device, n: int, segment_lengths, dilation_rates
) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = LongNetLM(
            64,
            d_model=args.d_model,
            nhead=args.heads,
            num_layers=args.layers,
            dim_feedforward=4 * args.d_model,
            segment_lengths=segment_lengths,
            dilation_rates=dilation_rates,
            head_mode=args.head_mode,
            position_embedding="rotary",
            device=device,
        )
        ids = torch.randint(0, 64, (1, n), device=device)
        amp = device.type == "cuda" and not args.fp32

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(ids).float().logsumexp(-1).mean()
            loss.backward()

        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t = time.perf_counter()
                step()
                times.append(1000 * (time.perf_counter() - t))
        out = {"step_ms": sorted(times)[len(times) // 2]}
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
    except torch.OutOfMemoryError:
        return {"oom": True}


def plot(result: dict, path: Path, model_name: str = "LongNetLM") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    losses = torch.tensor(result["losses"])
    window = max(1, len(losses) // 50)
    smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.plot(losses.numpy(), alpha=0.3, label="loss")
    ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.numpy(), label=f"mean of {window}")
    ax.axhline(math.log(1 / result["chance_accuracy"]), color="grey", linestyle="--", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy at the QUERY tokens")
    cfg = result["config"]
    ax.set_title(
        f"{model_name} recall, n={cfg['seq_len']}, {result['device']}: final accuracy "
        f"{result['final_accuracy']:.1%}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-queries", type=int, default=16)
    parser.add_argument(
        "--needle-length",
        type=int,
        default=None,
        help="copies of the value in a row (default: max dilation rate)",
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--segment-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--head-mode", choices=("grouped", "all"), default="grouped")
    parser.add_argument("--attention-type", default="auto")
    parser.add_argument("--position-embedding", choices=("xpos", "rotary"), default="xpos")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-dense", type=int, nargs="*", default=[], metavar="SEQ_LEN")
    parser.add_argument("--dense-budget-s", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("longnet_lm_run"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    result = train(args, device) if args.steps else {"losses": []}
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["torch"] = torch.__version__
    if args.steps:
        print(
            f"final accuracy {result['final_accuracy']:.1%} (chance {result['chance_accuracy']:.1%}) "
            f"after {args.steps} steps, {result['train_seconds']:.0f} s"
        )
        plot(result, args.output_dir / "loss.png")
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=1))
    if args.compare_dense:
        result["dense_comparison"] = compare_dense(args, device)
        (args.output_dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
