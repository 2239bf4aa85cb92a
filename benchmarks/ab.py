"""A/B of the fused path against another checkout of the package, or of two kernel
backends of this one, in one process.

    git archive <commit> dilated_attention_pytorch | tar -x -C .ab_base
    python benchmarks/ab.py --base .ab_base --workloads W1 W2 --seq-lens 131072 1048576 \\
        --output benchmarks/results/ab.jsonl
    python benchmarks/ab.py --backends sdpa_cudnn cudnn_frontend --output ab_backends.jsonl
    python benchmarks/ab.py --base .ab_base --impl multihead --seq-lens 1048576 --output mh.jsonl

The base package is imported under another name, with its registered operators under
another namespace (:func:`load_base`), so both run on the same GPU,
inputs and allocator state, alternating (``--rounds``), each timing the median
of ``--repeats`` with CUDA events after warm-up; the best round of each is kept.
With ``--backends BASE HEAD`` both variants are this checkout, with those backends.
``--impl multihead`` times the whole ``ImprovedMultiheadDilatedAttention`` self-attention
instead (projections included; one module per variant, the same weights) and records each
variant's peak memory of a forward+backward. ``--host`` adds each step's host time behind a
GPU sleep (``host_fwd_ms``, ``host_fwdbwd_ms``): what the step costs to enqueue, which is what
decides a short eager step.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from common import HOST_CALLS, host_ms, peak_mib
from run import WORKLOADS, Timer

import dilated_attention_pytorch as head

#: the ``torch.library`` namespace of the package's registered operators, and the base's
OP_NAMESPACE, BASE_OP_NAMESPACE = "dilated_attention", "dap_base"


def load_base(root: Path) -> ModuleType:
    """The package under ``root/dilated_attention_pytorch``, imported as ``dap_base``.

    Both packages register their operators under one name (``dilated_attention::*``),
    and the last registration serves both: every A/B would time one implementation
    twice. So the base is imported from a copy whose operators are ``dap_base::*``."""
    copy = Path(tempfile.mkdtemp(prefix="ab_base_")) / "dilated_attention_pytorch"
    shutil.copytree(root / "dilated_attention_pytorch", copy)
    for path in copy.rglob("*.py"):
        text = path.read_text()
        renamed = text.replace(f'"{OP_NAMESPACE}::', f'"{BASE_OP_NAMESPACE}::')
        if renamed != text:
            path.write_text(renamed)
    spec = importlib.util.spec_from_file_location(
        "dap_base", copy / "__init__.py", submodule_search_locations=[str(copy)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dap_base"] = module
    spec.loader.exec_module(module)
    return module


#: a package and the kernel backend its calls name (None: what "auto" picks)
Variant = tuple[ModuleType, str | None]


#: a variant's forward, and the tensors its forward+backward differentiates
Calls = tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]


def functional_calls(
    variant: Variant, pattern: object, causal: bool, inputs: tuple[torch.Tensor, ...]
) -> Calls:
    """The variant's attention on ``inputs``: q, k, v of shape (batch, seq, heads, head_dim)."""
    package, backend = variant
    q, k, v = inputs
    return lambda: package.functional.dilated_attention(
        q, k, v, pattern, is_causal=causal, backend=backend
    ), inputs


def multihead_calls(
    variant: Variant, pattern: object, causal: bool, inputs: tuple[torch.Tensor, ...], heads: int
) -> Calls:
    """The variant's multihead self-attention on ``inputs[0]``: x of shape (batch, seq, embed),
    the weights drawn from one seed so that every variant has the same."""
    package, backend = variant
    (x,) = inputs
    torch.manual_seed(0)
    module = package.ImprovedMultiheadDilatedAttention(
        x.shape[-1], heads, segment_lengths=pattern.segment_lengths, dilation_rates=pattern.dilation_rates,
        head_mode=pattern.head_mode, batch_first=True, device=x.device, dtype=x.dtype, backend=backend,
    )  # fmt: skip
    return lambda: module(x, x, x, is_causal=causal, need_weights=False)[0], (x, *module.parameters())


def time_call(
    calls: Calls, grad: torch.Tensor, timer: Timer, host: bool = False
) -> tuple[dict[str, float], float | None]:
    """Median ms of the forward (no grad) and of forward+backward, with ``host`` the
    host ms of each behind a GPU sleep too; and the step's peak MiB."""
    fwd, tensors = calls

    def fwd_bwd() -> None:
        for x in tensors:
            x.grad = None
        fwd().backward(grad)

    with torch.no_grad():
        times = {"fwd": timer(fwd)}
        if host:
            times["host_fwd"] = host_ms(fwd, HOST_CALLS["fwd"])
    times["fwdbwd"] = timer(fwd_bwd)
    if host:
        times["host_fwdbwd"] = host_ms(fwd_bwd, HOST_CALLS["fwdbwd"])
    return times, peak_mib(grad.device, fwd_bwd, tensors)


def compare(
    variants: dict[str, Variant],
    make_calls: Callable[[Variant, object], Calls],
    grad: torch.Tensor,
    timer: Timer,
    rounds: int,
    record: dict,
    host: bool = False,
) -> dict:
    """``record`` completed with each variant's best of ``rounds`` alternating timings
    (``make_calls(variant, pattern)``), its peak memory and head/base."""
    w = WORKLOADS[record["workload"]]
    best: dict[str, dict[str, float]] = {}
    peaks: dict[str, float | None] = {}
    for _ in range(rounds):
        for name, variant in variants.items():
            pattern = variant[0].DilatedPattern(
                w["segment_lengths"], w["dilation_rates"], record["head_mode"]
            )
            times, peaks[name] = time_call(make_calls(variant, pattern), grad, timer, host)
            best[name] = {k: min(t, best.get(name, times)[k]) for k, t in times.items()}
    record |= {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "backends": {name: backend for name, (_, backend) in variants.items()}}  # fmt: skip
    for name, times in best.items():
        for key, t in times.items():
            record[f"{name}_{key}_ms"] = round(t, 3)
        if peaks[name] is not None:
            record[f"{name}_peak_mib"] = round(peaks[name], 1)
    for key in best["head"]:
        record[f"{key}_ratio"] = round(best["head"][key] / best["base"][key], 3)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", type=Path, help="folder holding the base dilated_attention_pytorch")
    source.add_argument(
        "--backends", nargs=2, metavar=("BASE", "HEAD"), help="two kernel backends of this checkout"
    )
    p.add_argument("--impl", default="functional", choices=["functional", "multihead"])
    p.add_argument("--workloads", nargs="+", default=["W1"], choices=sorted(WORKLOADS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[131072])
    p.add_argument("--head-modes", nargs="+", default=["grouped", "all"], choices=["grouped", "all"])
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--host", action="store_true", help="also the host ms of each step behind a GPU sleep")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    if args.backends:
        variants: dict[str, Variant] = {"base": (head, args.backends[0]), "head": (head, args.backends[1])}
    else:
        variants = {"base": (load_base(args.base), None), "head": (head, None)}
    timer = Timer(device, args.warmup, args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for workload in args.workloads:
        w = WORKLOADS[workload]
        for n in args.seq_lens:
            if args.impl == "multihead":
                shape: tuple[int, ...] = (1, n, w["heads"] * w["head_dim"])
                inputs: tuple[torch.Tensor, ...] = (
                    torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True),
                )
            else:
                shape = (1, n, w["heads"], w["head_dim"])
                inputs = tuple(
                    torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3)
                )
            grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
            for head_mode in args.head_modes:
                for causal in (c == "true" for c in args.causal):
                    make_calls: Callable[[Variant, object], Calls] = (
                        functools.partial(multihead_calls, causal=causal, inputs=inputs, heads=w["heads"])
                        if args.impl == "multihead"
                        else functools.partial(functional_calls, causal=causal, inputs=inputs)
                    )
                    record = {"impl": args.impl, "workload": workload, "seq_len": n, "head_mode": head_mode,
                              "causal": causal}  # fmt: skip
                    compare(variants, make_calls, grad, timer, args.rounds, record, args.host)
                    print(json.dumps(record), flush=True)
                    with args.output.open("a") as out:
                        out.write(json.dumps(record) + "\n")
            del inputs, grad
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
