"""Block-sparse dilated attention (FlexAttention) against dense SDPA.

    python benchmarks/block_sparse.py [--quick] [--device cuda|cpu] [--output FILE.json] [--plot DIR]
        [--seq-lens ...] [--heads 16] [--head-dim 64] [--sparsity 0.9] [--pattern dilated_sparse]
        [--segment-lengths ...] [--dilation-rates ...] [--causal] [--dense-max-seq 131072]

Default pattern arguments: one branch ``segment_lengths=[seq]``, ``dilation_rates=[1]``,
so the block layout is the only saving and dense SDPA on the same sequence is
the fair ceiling. Per sequence length it records forward and forward+backward
time (CUDA events after warm-up, median), peak memory, the FLOPs of the
allowed query-key pairs and of the tiles the kernel runs, block-mask build time
and memory, and dense SDPA (each backend) up to ``--dense-max-seq``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import Timer, fwd_bwd, peak_mib, progress
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attention_pytorch import BlockSparseRingDilatedAttention, DilatedPattern
from dilated_attention_pytorch.sparse import block_mask as flex_kernel
from dilated_attention_pytorch.sparse.block_layout import prepare_layout

DENSE = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def allowed_pairs(
    pattern: DilatedPattern, layout4: torch.Tensor, block_size: int, seq: int, heads: int, causal: bool
) -> int:
    """Query-key pairs the pattern and layout allow (per batch element), counted
    per natural block: rows of block Q times keys of block K where allowed."""
    total = 0
    nb = layout4.shape[-1]
    for call in pattern.calls(seq, heads):
        layout = flex_kernel.call_layout(layout4, call)[0].to(torch.float64)  # (H', nb, nb)
        heads_factor = call.num_heads if layout.shape[0] == 1 else 1
        for s in range(call.num_segments):
            pos = (
                call.start + s * call.segment_length + call.offset + call.dilation * torch.arange(call.length)
            )
            counts = torch.bincount(pos // block_size, minlength=nb).to(torch.float64).to(layout.device)
            if causal:
                lower = torch.tril(layout, -1)
                pairs = (counts @ lower @ counts).sum() + (
                    layout.diagonal(dim1=-2, dim2=-1) * counts * (counts + 1) / 2
                ).sum()
            else:
                pairs = (counts @ layout @ counts).sum()
            total += int(pairs.item()) * heads_factor
    return total


def run_tiles(
    pattern: DilatedPattern, layout4: torch.Tensor, block_size: int, seq: int, heads: int, causal: bool
) -> int:
    """Query-key pairs of the tiles FlexAttention runs (partial tiles whole)."""
    total = 0
    for call in pattern.calls(seq, heads):
        need, _ = flex_kernel.tile_masks(call, layout4, block_size, causal, masked=False)
        heads_factor = call.num_heads if need.shape[2] == 1 else 1
        total += int(need.sum().item()) * flex_kernel.TILE**2 * heads_factor
    return total


def _block_mask_build(
    module, pattern, layout4, seq, heads, causal, device, timer
) -> tuple[float, float | None]:
    def build() -> None:
        for call in pattern.calls(seq, heads):
            flex_kernel.block_mask(call, layout4, module.block_size, causal, 1)

    ms = timer(build)
    mib = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        build()
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, mib


def _dense(seq: int, args: argparse.Namespace, device, dtype, timer: Timer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    q, k, v = (
        torch.randn(
            args.batch, args.heads, seq, args.head_dim, device=device, dtype=dtype, requires_grad=True
        )
        for _ in range(3)
    )
    grad = torch.randn_like(q)
    backends = DENSE if device.type == "cuda" else {"math": SDPBackend.MATH}
    for name, backend in backends.items():
        if name == "efficient" and seq > args.dense_max_seq // 2:
            continue  # several times slower than cuDNN; its number adds nothing at this size
        try:
            with sdpa_kernel(backend):

                def f():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

                out[name] = {"fwd_ms": timer(f), "fwdbwd_ms": timer(fwd_bwd(f, (q, k, v), grad))}
        except RuntimeError as e:
            out[name] = {"error": str(e).splitlines()[0][:200]}
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.empty(0, device=args.device).device  # with its index
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, args.warmup, args.repeats)
    records = []
    for seq in progress(args.seq_lens, "block-sparse"):
        segs = args.segment_lengths or [seq]
        dils = args.dilation_rates or [1]
        module = BlockSparseRingDilatedAttention(
            segs,
            dils,
            block_size=args.block_size,
            pattern=args.pattern,
            sparsity=args.sparsity,
            head_mode=args.head_mode,
            backend="flex" if device.type == "cuda" else "gather",
        )
        pattern = module.pattern
        t0 = time.perf_counter()
        layout = module.block_layout(seq, args.causal, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        layout_ms = (time.perf_counter() - t0) * 1e3
        layout4 = prepare_layout(
            layout, args.block_size, (args.batch, seq, args.heads, args.head_dim), dtype, device
        ).blocks
        q, k, v = (
            torch.randn(
                args.batch, seq, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True
            )
            for _ in range(3)
        )
        grad = torch.randn_like(q)

        def f(module=module, q=q, k=k, v=v):
            return module(q, k, v, is_causal=args.causal)

        fwd_ms = timer(f)
        fwdbwd_ms = timer(fwd_bwd(f, (q, k, v), grad))
        peak = peak_mib(device, fwd_bwd(f, (q, k, v), grad), (q, k, v))
        mask_ms, mask_mib = _block_mask_build(
            module, pattern, layout4, seq, args.heads, args.causal, device, timer
        )
        pairs = allowed_pairs(pattern, layout4, args.block_size, seq, args.heads, args.causal) * args.batch
        tile_pairs = run_tiles(pattern, layout4, args.block_size, seq, args.heads, args.causal) * args.batch
        flops_fwd = 4 * pairs * args.head_dim
        rec: dict[str, Any] = {
            "implementation": "block_sparse_flex" if device.type == "cuda" else "block_sparse_gather",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "batch": args.batch,
            "seq_len": seq,
            "num_heads": args.heads,
            "head_dim": args.head_dim,
            "segment_lengths": list(segs),
            "dilation_rates": list(dils),
            "head_mode": args.head_mode,
            "causal": args.causal,
            "pattern": args.pattern,
            "block_size": args.block_size,
            "sparsity": args.sparsity,
            "layout_sparsity": 1.0
            - pairs / max(1, args.batch * args.heads * (seq * (seq + 1) // 2 if args.causal else seq * seq)),
            "fwd_ms": fwd_ms,
            "fwdbwd_ms": fwdbwd_ms,
            "peak_mem_mib": peak,
            "allowed_pairs": pairs,
            "tile_pairs": tile_pairs,
            "tflops_fwd": flops_fwd / fwd_ms / 1e9,
            "tflops_fwdbwd": 3.5 * flops_fwd / fwdbwd_ms / 1e9,
            "layout_build_ms": layout_ms,
            "block_mask_build_ms": mask_ms,
            "block_mask_build_mib": mask_mib,
            "block_mask_over_fwd": mask_ms / fwd_ms,
        }
        del q, k, v, grad
        if seq <= args.dense_max_seq:
            dense = _dense(seq, args, device, dtype, timer)
            rec["dense"] = dense
            ok = {k: v for k, v in dense.items() if "error" not in v}
            if ok:
                best_f = min(x["fwd_ms"] for x in ok.values())
                best_fb = min(x["fwdbwd_ms"] for x in ok.values())
                dense_pairs = args.batch * args.heads * (seq * (seq + 1) // 2 if args.causal else seq * seq)
                dense_flops = 4 * dense_pairs * args.head_dim
                rec["dense_best_fwd_ms"], rec["dense_best_fwdbwd_ms"] = best_f, best_fb
                rec["speedup_fwd"], rec["speedup_fwdbwd"] = best_f / fwd_ms, best_fb / fwdbwd_ms
                rec["dense_tflops_fwd"] = dense_flops / best_f / 1e9
                rec["dense_tflops_fwdbwd"] = 3.5 * dense_flops / best_fb / 1e9
                rec["flop_rate_vs_dense_fwd"] = rec["tflops_fwd"] / rec["dense_tflops_fwd"]
                rec["flop_rate_vs_dense_fwdbwd"] = rec["tflops_fwdbwd"] / rec["dense_tflops_fwdbwd"]
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "dense"}), flush=True)
    return records


def plot(records: list[dict[str, Any]], out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    seqs = [r["seq_len"] for r in records]
    ax.loglog(seqs, [r["fwd_ms"] for r in records], "o-", label="block-sparse fwd")
    ax.loglog(seqs, [r["fwdbwd_ms"] for r in records], "s-", label="block-sparse fwd+bwd")
    dense = [r for r in records if "dense_best_fwd_ms" in r]
    if dense:
        ds = [r["seq_len"] for r in dense]
        ax.loglog(ds, [r["dense_best_fwd_ms"] for r in dense], "o--", label="dense SDPA fwd (best)")
        ax.loglog(ds, [r["dense_best_fwdbwd_ms"] for r in dense], "s--", label="dense SDPA fwd+bwd (best)")
    ax.loglog(seqs, [r["block_mask_build_ms"] for r in records], "x:", label="block-mask build")
    r0 = records[0]
    ax.set_title(
        f"{r0['device']}, {r0['dtype']}, {r0['num_heads']}x{r0['head_dim']}, sparsity {r0['sparsity']}"
    )
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"block_sparse_{r0['pattern']}{'_causal' if r0['causal'] else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, CPU-friendly (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 131072, 262144, 524288, 1048576])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="dilated_sparse")
    p.add_argument("--segment-lengths", type=int, nargs="+", default=None)
    p.add_argument("--dilation-rates", type=int, nargs="+", default=None)
    p.add_argument("--head-mode", default="grouped")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dense-max-seq", type=int, default=131072)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.heads, args.head_dim, args.block_size = [512, 1024], 2, 16, 32
        args.dense_max_seq, args.warmup, args.repeats = 1024, 1, 2
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    records = run(args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, args.plot)
    return records


if __name__ == "__main__":
    main()
