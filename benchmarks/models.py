"""What today's decoder models exercise: grouped-query heads, queries at the end
of the keys, and torch.compile, measured on one GPU.

    python benchmarks/models.py --output benchmarks/results/h200_models.json

Records (one JSON list):

- ``gqa``: forward+backward of the fused path with 32 query heads and
  ``kv_heads`` in {32, 8, 1}, causal or not, both head modes: median ms (CUDA
  events after warm-up), peak MiB above the inputs, and the bytes of K, V and
  their gradients; ``native`` False repeats key/value per call (the fallback of
  a kernel that does not share heads), for the same shapes.
- ``window``: forward of ``seqlen_q`` queries at the end of ``seqlen_k`` keys
  against the full-length forward.
- ``varlen``: packed documents (a long-tailed mix summing to n tokens) against
  one unpacked n-token sequence, forward+backward, and the pattern's TFLOP/s
  of each (the packed FLOPs are counted per document); the varlen kernel that
  ran, peak MiB, the time with the varlen kernel for every row (where whole
  segments run on a dense kernel beside it), and with ``--varlen-groups`` the
  time of the equal-length groups path (kernels without a varlen form), all in
  the same run.
- ``compile``: forward+backward of ``ImprovedMultiheadDilatedAttention`` eager,
  ``torch.compile`` (default) and ``mode="reduce-overhead"`` (CUDA graphs).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import Timer, fwd_bwd, peak_mib

from dilated_attention_pytorch import (
    DilatedPattern,
    ImprovedMultiheadDilatedAttention,
    dilated_attention,
    dilated_attention_varlen,
    functional,
    kernels,
)
from dilated_attention_pytorch.core import packed as packed_module
from dilated_attention_pytorch.core.packed import PackedKernels, packed_backend

SEG = [2048, 4096, 8192, 16384, 32768]
DIL = [1, 2, 4, 6, 12]


def _gqa_record(
    timer: Timer, device: torch.device, n: int, kv_heads: int, head_mode: str, causal: bool, native: bool
) -> dict[str, Any]:
    h, d = 32, 128
    q = torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, n, kv_heads, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn_like(q)
    chosen = kernels.select_backend(kernels.AttentionSpec.from_tensor(q, tokens=n))
    declared = type(chosen).SUPPORTS_GQA
    type(chosen).SUPPORTS_GQA = declared and native
    try:
        step = fwd_bwd(
            lambda: dilated_attention(q, k, v, SEG, DIL, head_mode=head_mode, is_causal=causal),
            (q, k, v),
            grad,
        )
        inputs_mib = sum(x.numel() * x.element_size() for x in (q, k, v, grad)) / 2**20
        peak = peak_mib(device, step, (q, k, v))
        ms = timer(step)
    finally:
        type(chosen).SUPPORTS_GQA = declared
    return {
        "bench": "gqa", "seq_len": n, "heads": h, "kv_heads": kv_heads, "head_dim": d, "head_mode": head_mode,
        "causal": causal, "backend": chosen.name, "native": bool(declared and native), "fwd_bwd_ms": ms,
        "peak_mib_above_inputs": None if peak is None else peak - inputs_mib,
        # K, V and their gradients
        "kv_and_grads_mib": 4 * k.numel() * k.element_size() / 2**20,
    }  # fmt: skip


def _gqa(args: argparse.Namespace, timer: Timer, device: torch.device) -> Iterator[dict[str, Any]]:
    for kv_heads in (32, 8, 1):
        for head_mode in ("grouped", "all"):
            for causal in (False, True):
                for native in (True, False) if kv_heads < 32 else (True,):
                    record = _gqa_record(timer, device, args.gqa_seq_len, kv_heads, head_mode, causal, native)
                    print(record, flush=True)
                    yield record
                    torch.cuda.empty_cache()


def _window(args: argparse.Namespace, timer: Timer, device: torch.device) -> Iterator[dict[str, Any]]:
    n, h, d = args.window_seq_len, 32, 128
    k, v = (torch.randn(1, n, 8, d, device=device, dtype=torch.bfloat16) for _ in "kv")
    for seq_q in (1, 4096, n):
        q = torch.randn(1, seq_q, h, d, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            ms = timer(lambda q=q: dilated_attention(q, k, v, SEG, DIL, head_mode="all", is_causal=True))
        record = {"bench": "window", "seq_k": n, "seq_q": seq_q, "kv_heads": 8, "fwd_ms": ms}
        print(record, flush=True)
        yield record


def long_tailed_lengths(total: int, seed: int = 0) -> list[int]:
    """Document lengths of a long-tailed mix (log-uniform over 64 .. 256K tokens) summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(2 ** (6 + 12 * torch.rand((), generator=g).item())))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def _varlen_record(
    timer: Timer, device: torch.device, lengths: list[int], head_mode: str, causal: bool, groups_too: bool
) -> dict[str, Any]:
    n, h, kv_heads, d = sum(lengths), 32, 8, 128
    pattern = DilatedPattern(SEG, DIL, head_mode)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q = torch.randn(n, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(n, kv_heads, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn_like(q)
    packed = fwd_bwd(
        lambda: dilated_attention_varlen(q, k, v, cu, max(lengths), pattern, is_causal=causal),
        (q, k, v),
        grad,
    )
    unpacked = fwd_bwd(
        lambda: dilated_attention(q[None], k[None], v[None], pattern, is_causal=causal)[0], (q, k, v), grad
    )
    chosen = packed_backend(q, v, None)
    inputs_mib = sum(x.numel() * x.element_size() for x in (q, k, v, grad)) / 2**20
    packed_peak, unpacked_peak = (peak_mib(device, f, (q, k, v)) for f in (packed, unpacked))
    packed_ms, unpacked_ms = timer(packed), timer(unpacked)
    groups_ms = varlen_only_ms = None
    real = functional.packed_backend
    if groups_too:  # the path of kernels without a varlen form: documents of one length per call
        functional.packed_backend = lambda *a: None  # type: ignore[assignment]
        try:
            groups_ms = timer(packed)
        finally:
            functional.packed_backend = real
    gathered_ms = None
    if chosen is not None and chosen.dense is not None:  # A/B: the varlen kernel for every row
        functional.packed_backend = lambda *a: PackedKernels(chosen.varlen)  # type: ignore[assignment]
        try:
            varlen_only_ms = timer(packed)
        finally:
            functional.packed_backend = real
        # A/B: long documents' whole segments gathered like the rest instead of read in place
        in_place_min_rows = packed_module.IN_PLACE_MIN_ROWS
        packed_module.IN_PLACE_MIN_ROWS = n + 1
        try:
            gathered_ms = timer(packed)
        finally:
            packed_module.IN_PLACE_MIN_ROWS = in_place_min_rows
    flops_packed = sum(pattern.flops(m, h, d, causal=causal, backward=True) for m in lengths)
    flops_unpacked = pattern.flops(n, h, d, causal=causal, backward=True)
    return {
        "bench": "varlen", "total_tokens": n, "num_docs": len(lengths), "longest": max(lengths),
        "shortest": min(lengths), "heads": h, "kv_heads": kv_heads, "head_dim": d, "head_mode": head_mode,
        "causal": causal, "packed_kernels": None if chosen is None else chosen.name,
        "packed_fwd_bwd_ms": packed_ms, "unpacked_fwd_bwd_ms": unpacked_ms, "groups_fwd_bwd_ms": groups_ms,
        "varlen_only_fwd_bwd_ms": varlen_only_ms, "whole_segments_gathered_fwd_bwd_ms": gathered_ms,
        "time_ratio": packed_ms / unpacked_ms, "packed_tflops": flops_packed / packed_ms / 1e9,
        "unpacked_tflops": flops_unpacked / unpacked_ms / 1e9,
        "tflops_ratio": (flops_packed / packed_ms) / (flops_unpacked / unpacked_ms),
        "packed_peak_mib_above_inputs": None if packed_peak is None else packed_peak - inputs_mib,
        "unpacked_peak_mib_above_inputs": None if unpacked_peak is None else unpacked_peak - inputs_mib,
    }  # fmt: skip


def _varlen(args: argparse.Namespace, timer: Timer, device: torch.device) -> Iterator[dict[str, Any]]:
    """Packed documents summing to n tokens against one unpacked n-token sequence:
    fwd+bwd time and the pattern's FLOPs per second of each (FLOPs counted per document)."""
    lengths = long_tailed_lengths(args.varlen_seq_len)
    for head_mode in args.varlen_modes:
        for causal in (True, False):
            record = _varlen_record(timer, device, lengths, head_mode, causal, args.varlen_groups)
            print(record, flush=True)
            yield record
            torch.cuda.empty_cache()


def _compile(args: argparse.Namespace, timer: Timer, device: torch.device) -> Iterator[dict[str, Any]]:
    for n in args.compile_seq_lens:
        torch.manual_seed(0)
        module = ImprovedMultiheadDilatedAttention(
            768, 12, segment_lengths=SEG, dilation_rates=DIL, batch_first=True, device=device,
            dtype=torch.bfloat16,
        )  # fmt: skip
        x = torch.randn(1, n, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        for mode in ("eager", "default", "reduce-overhead"):
            fn = module if mode == "eager" else torch.compile(module, mode=mode, fullgraph=True)

            def step(fn: Any = fn, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
                x.grad = None
                fn(x, x, x, is_causal=True)[0].backward(grad)

            ms = timer(step)
            record = {"bench": "compile", "seq_len": n, "mode": mode, "fwd_bwd_ms": ms, "heads": 12}
            print(record, flush=True)
            yield record
        torch._dynamo.reset()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, help="write the records as JSON")
    p.add_argument("--gqa-seq-len", type=int, default=1 << 20)
    p.add_argument("--window-seq-len", type=int, default=1 << 20)
    p.add_argument("--compile-seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--varlen-seq-len", type=int, default=1 << 20)
    p.add_argument("--varlen-modes", nargs="+", default=["grouped", "all"])
    p.add_argument(
        "--varlen-groups", action="store_true", help="also time the equal-length groups path (A/B)"
    )
    p.add_argument("--benches", nargs="+", default=["gqa", "window", "compile", "varlen"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, args.warmup, args.repeats)
    header = {"bench": "header", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda": torch.version.cuda}  # fmt: skip
    print(header, flush=True)
    records: list[dict[str, Any]] = [header]
    for bench in args.benches:
        # every record is written as soon as it is measured: a later failure keeps the rest
        for record in {"gqa": _gqa, "window": _window, "compile": _compile, "varlen": _varlen}[bench](
            args, timer, device
        ):
            records.append(record)
            if args.output:
                args.output.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
