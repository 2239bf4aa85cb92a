"""Time forward and forward+backward of the dilated-attention implementations,
measure peak memory, and compare with dense SDPA on the same sub-problems.

    python benchmarks/run.py --quick --device cpu
    python benchmarks/run.py --device cuda --seq-lens 32768 131072 1048576 \\
        --output benchmarks/results/h100.json --plot benchmarks/results

Timing: CUDA events after warm-up, median of repeats (perf_counter on CPU).
Memory: ``torch.cuda.max_memory_allocated`` during forward+backward, everything
live counted (q, k, v and the incoming gradient too); ``peak_over_io`` divides
it by the size of q, k, v, output and their four gradients.
The ceiling ("dense_<backend>") runs SDPA with one backend on exactly the
``(batch·segments, heads, length, head_dim)`` problems the pattern needs,
contiguous, and is credited with the same FLOPs: its TFLOP/s is the rate the
dilated implementation would reach if it lost nothing to the dilation.
Registry kernels outside SDPA (FlashAttention-4, cuDNN's graph API, xformers,
where installed) are timed as ceilings too, called directly. The ratios are to the fastest dense backend
(``best_dense_fwd`` / ``best_dense_fwdbwd`` name it); each dense record keeps
every problem shape's own times under ``problems``.
"dense_large_<backend>" runs the kernel "improved" uses on one large dense
problem of the same head_dim (``--large-dense-shape``, batch·heads·length):
``ratio_to_large_dense_fwd`` is the share of that kernel's best rate the
dilated path reaches. "multihead" times the whole
``ImprovedMultiheadDilatedAttention`` (projections included) on
``(batch, seq, heads·head_dim)``; ``attention_share_fwdbwd`` is the core's
("improved") time over it, in the same run, and its TFLOP/s count the
attention's FLOPs only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from baseline import baseline_dilated_attention
from common import WORKLOADS, Timer, fwd_bwd, peak_mib, progress
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attention_pytorch import DilatedPattern, ImprovedMultiheadDilatedAttention, functional, kernels

DENSE_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
#: registry kernels timed as dense ceilings where they can run (not reachable through SDPA)
DENSE_KERNEL_BACKENDS = ("flash_attn_4", "cudnn_frontend", "xformers")


def _implementations(
    args: argparse.Namespace, pattern: DilatedPattern, seq: int, causal: bool
) -> dict[str, Callable]:
    impls: dict[str, Callable] = {}
    if "improved" in args.impls:
        impls["improved"] = lambda q, k, v: functional.dilated_attention(
            q, k, v, pattern, is_causal=causal, backend=args.backend
        )
    if "standard" in args.impls:
        impls["standard"] = lambda q, k, v: functional.dilated_attention(
            q, k, v, pattern, is_causal=causal, method="gather"
        )
    if "baseline" in args.impls and pattern.head_mode == "grouped":
        impls["baseline"] = lambda q, k, v: baseline_dilated_attention(
            q, k, v, pattern.segment_lengths, pattern.dilation_rates, causal
        )
    if "dense_full" in args.impls and seq <= args.full_dense_max_seq:
        # what dilated attention replaces: dense attention over the whole sequence (SDPA picks the kernel)
        impls["dense_full"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
    return impls


def _dense_kernel_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Registry kernels outside SDPA (FlashAttention-4, cuDNN graphs, xformers where installed)
    that run dense problems: the ceiling must include them, or an implementation on them is
    judged against a slower kernel."""
    if device.type != "cuda":
        return []
    spec = kernels.AttentionSpec(
        device.type, dtype, head_dim, False, torch.cuda.get_device_capability(device)
    )
    return [name for name in DENSE_KERNEL_BACKENDS if not kernels.REGISTRY[name].not_supported_reasons(spec)]


def _dense_problem_fns(
    name: str, shape: tuple[int, int, int], head_dim: int, causal: bool, device, dtype
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) of one dense problem ``(batch·segments, heads, length)``."""
    bb, hh, ll = shape
    if name in DENSE_BACKENDS:
        q, k, v = (
            torch.randn(bb, hh, ll, head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)

        def f() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return f, fwd_bwd(f, (q, k, v), grad)
    # a registry kernel, called directly (no autograd bookkeeping: a ceiling no slower than its use)
    backend, scale = kernels.REGISTRY[name], head_dim**-0.5
    q, k, v, grad = (
        torch.randn(bb, ll, hh, head_dim, device=device, dtype=dtype).transpose(1, 2) for _ in range(4)
    )

    def fwd() -> tuple[torch.Tensor, torch.Tensor, Any]:
        return backend.forward(q, k, v, None, causal, scale)

    def step() -> None:
        out, lse, state = fwd()
        backend.backward(grad, q, k, v, out, lse, None, causal, scale, state)

    return fwd, step


def _dense_ceiling(
    pattern: DilatedPattern, args: argparse.Namespace, seq: int, causal: bool, device, dtype, timer: Timer
) -> dict[str, dict[str, Any]]:
    """Per dense backend: fwd and fwd+bwd ms summed over the pattern's sub-problems, and each
    problem shape's own times (``problems``)."""
    shapes: dict[tuple[int, int, int], int] = {}
    # the problems the fused path runs ("all" mode: heads batched along diagonals)
    for call in pattern.calls(seq, args.heads, diagonal=True):
        shape = (args.batch * call.num_segments, call.num_heads, call.length)
        shapes[shape] = shapes.get(shape, 0) + 1
    results: dict[str, dict[str, Any]] = {}
    if device.type == "cpu":
        backends = ["math"]
    else:
        backends = [b for b in DENSE_BACKENDS if b != "math"]
        backends += _dense_kernel_backends(device, dtype, args.head_dim)
    for name in backends:
        fwd = fwdbwd = 0.0
        problems = []
        try:
            with sdpa_kernel(DENSE_BACKENDS[name]) if name in DENSE_BACKENDS else contextlib.nullcontext():
                for shape, count in shapes.items():
                    f, step = _dense_problem_fns(name, shape, args.head_dim, causal, device, dtype)
                    problem = {"shape": list(shape), "count": count, "fwd_ms": timer(f)}
                    if not args.no_backward:
                        problem["fwdbwd_ms"] = timer(step)
                        fwdbwd += count * problem["fwdbwd_ms"]
                    fwd += count * problem["fwd_ms"]
                    problems.append(problem)
                    del f, step
        except RuntimeError as e:  # backend cannot run these shapes/dtype
            results[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        results[name] = {
            "fwd_ms": fwd,
            "fwdbwd_ms": fwdbwd if not args.no_backward else None,
            "problems": problems,
        }
    return results


def _dense_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> dict[str, float]:
    """``flops_fwd`` and ``flops_fwdbwd`` of dense attention over ``length`` tokens."""
    flops = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    return {"flops_fwd": flops, "flops_fwdbwd": 3.5 * flops}


def _set_tflops(rec: dict[str, Any]) -> None:
    for key, ms in (("tflops_fwd", "fwd_ms"), ("tflops_fwdbwd", "fwdbwd_ms")):
        if rec.get(ms):
            rec[key] = rec["flops" + key[6:]] / rec[ms] / 1e9


def _rebase_full_dense(rec: dict[str, Any], seq: int, args: argparse.Namespace, causal: bool) -> None:
    rec.update(_dense_flops(args.batch, args.heads, seq, args.head_dim, causal))
    for key in ("ratio_to_dense_fwd", "ratio_to_dense_fwdbwd", "best_dense_fwd", "best_dense_fwdbwd"):
        rec.pop(key, None)
    _set_tflops(rec)


def _large_dense(
    backend: str, args: argparse.Namespace, causal: bool, device, dtype, timer: Timer
) -> dict[str, Any]:
    """The registry kernel ``backend`` on one large dense problem (its best rate)."""
    bb, hh, ll = args.large_dense_shape
    rec: dict[str, Any] = {
        "implementation": f"dense_large_{backend}", "backend": backend, "shape": [bb, hh, ll],
        **_dense_flops(bb, hh, ll, args.head_dim, causal),
    }  # fmt: skip
    f, step = _dense_problem_fns(backend, (bb, hh, ll), args.head_dim, causal, device, dtype)
    rec["fwd_ms"] = timer(f)
    if not args.no_backward:
        rec["fwdbwd_ms"] = timer(step)
    _set_tflops(rec)
    return rec


def _multihead(
    args: argparse.Namespace, pattern: DilatedPattern, seq: int, causal: bool, device, dtype
) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]:
    """The multihead module's forward on fresh inputs, and the tensors a step differentiates."""
    embed = args.heads * args.head_dim
    module = ImprovedMultiheadDilatedAttention(
        embed, args.heads, segment_lengths=pattern.segment_lengths, dilation_rates=pattern.dilation_rates,
        head_mode=pattern.head_mode, batch_first=True, device=device, dtype=dtype, backend=args.backend,
    )  # fmt: skip
    x = torch.randn(args.batch, seq, embed, device=device, dtype=dtype, requires_grad=True)

    def fn() -> torch.Tensor:
        return module(x, x, x, is_causal=causal, need_weights=False)[0]

    return fn, (x, *module.parameters())


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, args.warmup, args.repeats, args.cuda_graph)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    records = []
    large: dict[tuple[str, bool], dict[str, Any]] = {}  # per (kernel, causal): one record a run
    configs = [(seq, hm, causal) for seq in args.seq_lens for hm in args.head_modes for causal in args.causal]
    for seq, head_mode, causal in progress(configs, "configs"):
        pattern = DilatedPattern(args.segment_lengths, args.dilation_rates, head_mode)
        flops_fwd = pattern.flops(seq, args.heads, args.head_dim, args.batch, causal)
        flops_fwdbwd = pattern.flops(seq, args.heads, args.head_dim, args.batch, causal, backward=True)
        common = {
            "device": gpu,
            "torch": torch.__version__,
            "dtype": args.dtype,
            "batch": args.batch,
            "seq_len": seq,
            "num_heads": args.heads,
            "head_dim": args.head_dim,
            "segment_lengths": list(args.segment_lengths),
            "dilation_rates": list(args.dilation_rates),
            "head_mode": head_mode,
            "causal": causal,
            "cuda_graph": args.cuda_graph and device.type == "cuda",
            "flops_fwd": flops_fwd,
            "flops_fwdbwd": flops_fwdbwd,
        }
        dense = (
            _dense_ceiling(pattern, args, seq, causal, device, dtype, timer) if "dense" in args.impls else {}
        )
        best_fwd_name = min(
            (n for n, d in dense.items() if "fwd_ms" in d), key=lambda n: dense[n]["fwd_ms"], default=None
        )
        best_fwdbwd_name = min(
            (n for n, d in dense.items() if d.get("fwdbwd_ms")),
            key=lambda n: dense[n]["fwdbwd_ms"],
            default=None,
        )
        best_fwd = dense[best_fwd_name]["fwd_ms"] if best_fwd_name else None
        best_fwdbwd = dense[best_fwdbwd_name]["fwdbwd_ms"] if best_fwdbwd_name else None
        for name, d in dense.items():
            rec = {**common, "implementation": f"dense_{name}", "backend": name, **d}
            if "fwd_ms" in d:
                rec["tflops_fwd"] = flops_fwd / d["fwd_ms"] / 1e9
                if d.get("fwdbwd_ms"):
                    rec["tflops_fwdbwd"] = flops_fwdbwd / d["fwdbwd_ms"] / 1e9
            records.append(rec)
        q, k, v = (
            torch.randn(
                args.batch, seq, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True
            )
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        spec = kernels.AttentionSpec.from_tensor(q, tokens=q.shape[0] * q.shape[1])  # what 'auto' weighs
        core: dict[str, Any] | None = None  # the "improved" record of this configuration
        for name, impl in _implementations(args, pattern, seq, causal).items():

            def fn(impl=impl, q=q, k=k, v=v):
                return impl(q, k, v)

            rec = {**common, "implementation": name}
            rec["backend"] = kernels.select_backend(spec, args.backend).name if name == "improved" else "sdpa"
            try:
                with torch.no_grad():
                    rec["fwd_ms"] = timer(fn)
                    rec["peak_mem_fwd_mib"] = peak_mib(device, fn, (q, k, v))
                rec["tflops_fwd"] = flops_fwd / rec["fwd_ms"] / 1e9
                if best_fwd:
                    rec["ratio_to_dense_fwd"] = best_fwd / rec["fwd_ms"]
                    rec["best_dense_fwd"] = best_fwd_name
                if not args.no_backward:
                    step = fwd_bwd(fn, (q, k, v), grad)
                    rec["fwdbwd_ms"] = timer(step)
                    rec["peak_mem_mib"] = peak_mib(device, step, (q, k, v))
                    rec["tflops_fwdbwd"] = flops_fwdbwd / rec["fwdbwd_ms"] / 1e9
                    if best_fwdbwd:
                        rec["ratio_to_dense_fwdbwd"] = best_fwdbwd / rec["fwdbwd_ms"]
                        rec["best_dense_fwdbwd"] = best_fwdbwd_name
                    # q, k, v, output and their gradients: what training must hold
                    rec["io_mib"] = 8 * q.numel() * q.element_size() / 2**20
                    if rec["peak_mem_mib"] is not None:
                        rec["peak_over_io"] = rec["peak_mem_mib"] / rec["io_mib"]
            except torch.OutOfMemoryError:
                rec["error"] = "out of memory"
                torch.cuda.empty_cache()
            if name == "dense_full":  # another function: its own FLOPs, no ratio to the pattern's ceiling
                _rebase_full_dense(rec, seq, args, causal)
            if name == "improved":
                core = rec
            if name == "improved" and args.large_dense_shape and "fwd_ms" in rec:
                if (rec["backend"], causal) not in large:
                    found = _large_dense(rec["backend"], args, causal, device, dtype, timer)
                    large[rec["backend"], causal] = found
                    records.append({**common, **found, "seq_len": None})
                ceiling = large[rec["backend"], causal]
                for mode in ("fwd", "fwdbwd"):
                    if rec.get(f"tflops_{mode}") and ceiling.get(f"tflops_{mode}"):
                        rec[f"ratio_to_large_dense_{mode}"] = (
                            rec[f"tflops_{mode}"] / ceiling[f"tflops_{mode}"]
                        )
            records.append(rec)
        # the last step's closures hold q, k, v and grad: gone before the next peak is measured
        fn = step = None
        del q, k, v, grad
        if "multihead" in args.impls:
            records.append(_multihead_record(args, pattern, seq, causal, device, dtype, timer, common, core))
    return records


def _multihead_record(
    args: argparse.Namespace,
    pattern: DilatedPattern,
    seq: int,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype,
    timer: Timer,
    common: dict[str, Any],
    core: dict[str, Any] | None,
) -> dict[str, Any]:
    """The whole module's record; ``core``: the "improved" record of the same configuration."""
    rec: dict[str, Any] = {**common, "implementation": "multihead", "backend": args.backend or "auto"}
    try:
        fn, tensors = _multihead(args, pattern, seq, causal, device, dtype)
        with torch.no_grad():
            rec["fwd_ms"] = timer(fn)
        if not args.no_backward:
            grad = torch.randn(args.batch, seq, args.heads * args.head_dim, device=device, dtype=dtype)
            step = fwd_bwd(fn, tensors, grad)
            rec["fwdbwd_ms"] = timer(step)
            rec["peak_mem_mib"] = peak_mib(device, step, tensors[:1])
    except torch.OutOfMemoryError:
        rec["error"] = "out of memory"
        torch.cuda.empty_cache()
    _set_tflops(rec)  # the attention's FLOPs (from common) over the module's time
    for mode in ("fwd", "fwdbwd"):
        if core is not None and core.get(f"{mode}_ms") and rec.get(f"{mode}_ms"):
            rec[f"attention_share_{mode}"] = core[f"{mode}_ms"] / rec[f"{mode}_ms"]
    return rec


def _pattern_label(r: dict[str, Any]) -> str:
    w = ",".join(f"{s // 1024}K" if s >= 1024 else str(s) for s in r["segment_lengths"])
    return f"w=({w}) r=({','.join(map(str, r['dilation_rates']))})"


def plot(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per metric, head mode and masking: time, peak memory and the fraction of
    the dense ceiling against the sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = sorted({(r["head_mode"], r["causal"]) for r in records})
    for metric, label in (
        ("fwdbwd_ms", "forward+backward time (ms)"),
        ("peak_mem_mib", "peak memory, forward+backward (MiB)"),
        ("ratio_to_dense_fwdbwd", "forward+backward, fraction of best dense"),
        ("ratio_to_dense_fwd", "forward, fraction of best dense"),
    ):
        ratio = metric.startswith("ratio_")
        for hm, causal in groups:
            # (the large dense problem has no sequence length: not a point of these curves)
            rows = [r for r in records if (r["head_mode"], r["causal"]) == (hm, causal) and r.get(metric)]
            rows = [r for r in rows if r["seq_len"] is not None]
            if not rows:  # e.g. memory on CPU: nothing measured, no empty figure
                continue
            fig, ax = plt.subplots(figsize=(7, 4.8))
            for impl in sorted({r["implementation"] for r in rows}):
                pts = sorted((r["seq_len"], r[metric]) for r in rows if r["implementation"] == impl)
                # the fast path's kernel backend is in its label: "auto" picks by hardware and size
                backends = {r.get("backend") for r in rows if r["implementation"] == impl}
                name = f"{impl} ({backends.pop()})" if impl == "improved" and len(backends) == 1 else impl
                (ax.semilogx if ratio else ax.loglog)(*zip(*pts), marker="o", linewidth=2, label=name)
            if ratio:  # the dense kernel on the same problems is 1
                ax.axhline(1.0, color="gray", linewidth=1)
                ax.set_ylim(0, 1.1)
            r0 = rows[0]
            ax.set_title(
                f"{r0['device']}, {r0['dtype']}, {r0['num_heads']} heads x {r0['head_dim']}\n"
                f"{_pattern_label(r0)}, {hm} heads, {'causal' if causal else 'no mask'}",
                fontsize=11,
            )
            ax.set_xlabel("sequence length (tokens)", fontsize=11)
            ax.set_ylabel(label, fontsize=11)
            ax.tick_params(labelsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{metric}_{hm}_{'causal' if causal else 'full'}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _bool(text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "causal"):
        return True
    if value in ("0", "false", "no", "full"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no), got {text!r}")


def _given(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of the options named on the command line."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repeats (a CPU smoke run); options given explicitly are kept",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, help="write the records as JSON")
    p.add_argument("--plot", type=Path, help="write PNG plots into this folder")
    p.add_argument("--workload", choices=sorted(WORKLOADS), help="preset heads/head_dim/pattern")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float64"])
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 6, 12])
    p.add_argument("--head-modes", nargs="+", default=["grouped"], choices=["grouped", "all"])
    p.add_argument("--causal", nargs="+", type=_bool, default=[False], help="one run per value: true/false")
    p.add_argument(
        "--impls",
        nargs="+",
        default=["improved", "standard", "baseline", "dense"],
        choices=["improved", "standard", "baseline", "dense", "dense_full", "multihead"],
        help="dense: the dense kernels on the pattern's own sub-problems (the ceiling); "
        "dense_full: dense attention over the whole sequence; multihead: the whole "
        "ImprovedMultiheadDilatedAttention, projections included",
    )
    p.add_argument(
        "--large-dense-shape",
        type=int,
        nargs=3,
        default=[8, 16, 8192],
        metavar=("BATCH", "HEADS", "LENGTH"),
        help="the one large dense problem improved's kernel is also timed on (0 0 0: none)",
    )
    p.add_argument(
        "--full-dense-max-seq",
        type=int,
        default=262144,
        help="longest sequence dense_full runs at (its time grows with the square of the length)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time CUDA-graph replays of every implementation and dense problem (no host time per kernel)",
    )
    p.add_argument("--backend", help="kernel backend of 'improved' (default: what 'auto' picks)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    given = _given(argv, p)
    if args.large_dense_shape == [0, 0, 0]:
        args.large_dense_shape = None
    presets: dict[str, Any] = dict(WORKLOADS[args.workload]) if args.workload else {}
    if args.quick:
        presets.update(seq_lens=[256, 512], heads=4, head_dim=16, segment_lengths=[64, 128, 256])
        presets.update(dilation_rates=[1, 2, 4], warmup=1, repeats=3, large_dense_shape=[2, 2, 256])
        if args.device == "cpu":
            presets["dtype"] = "float32"
    for key, value in presets.items():
        if key not in given:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"# {gpu}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, {args.heads} heads x "
        f"{args.head_dim}, segment_lengths {args.segment_lengths}, dilation_rates {args.dilation_rates}, "
        f"head modes {args.head_modes}, causal {args.causal}, lengths {args.seq_lens}, "
        f"{args.warmup} warm-up + median of {args.repeats}{', CUDA graphs' if args.cuda_graph else ''}"
    )
    records = run(args)
    for r in records:
        cols = [r["implementation"], r["seq_len"], r["head_mode"], "causal" if r["causal"] else "full"]
        vals = [
            f"{k}={r[k]:.3g}"
            for k in (
                "fwd_ms",
                "fwdbwd_ms",
                "tflops_fwd",
                "tflops_fwdbwd",
                "ratio_to_dense_fwd",
                "ratio_to_dense_fwdbwd",
                "ratio_to_large_dense_fwd",
                "attention_share_fwdbwd",
                "peak_mem_mib",
                "peak_over_io",
            )
            if isinstance(r.get(k), float)
        ]
        print(" ".join(map(str, cols)), *vals, r.get("error", ""))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(records, indent=1))
    if args.plot:
        for path in plot(records, args.plot):
            print("wrote", path)
    return records


if __name__ == "__main__":
    main()
