"""``python -m dilated_attention_pytorch.info``: the environment and what "auto" picks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from . import __version__, kernels
from .factory import explain_auto

#: the distribution of this package (the import package is dilated_attention_pytorch)
DISTRIBUTION = "torch-dilated-attention"


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _optional(
    import_name: str, *dist_names: str, used_by: str = "not used by this version", extra: str | None = None
) -> str:
    if importlib.util.find_spec(import_name) is None:
        return f'not installed (pip install "{DISTRIBUTION}[{extra}]")' if extra else "not installed"
    return f"installed ({_dist_version(*dist_names) or 'version unknown'}); {used_by}"


def _cuda_line() -> str:
    if torch.version.cuda is None:
        return "CUDA: CPU-only build of torch" + (" (ROCm build)" if torch.version.hip else "")
    return f"CUDA: built with CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"


def _determinism() -> str:
    flags = {
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
    }
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return (
        "determinism: "
        + ", ".join(f"{k}={v}" for k, v in flags.items())
        + (f", CUBLAS_WORKSPACE_CONFIG={config}" if config else "")
    )


def report() -> str:
    lines = [
        f"dilated_attention_pytorch {__version__} (distribution {DISTRIBUTION})",
        f"Python {platform.python_version()} ({sys.implementation.name}), {platform.platform()}",
        f"CPU threads: torch uses {torch.get_num_threads()} of {os.cpu_count()} logical CPUs",
        f"torch {torch.__version__}",
        _dist_version("einops") or "einops: not installed (required)",
        "triton: " + (_dist_version("triton", "pytorch-triton") or "not installed"),
        _cuda_line(),
        _determinism(),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            lines.append(f"  GPU {i}: {torch.cuda.get_device_name(i)}, compute capability {cc[0]}.{cc[1]}")
        lines.append(f"  cuDNN: {torch.backends.cudnn.version()}")
        cuda = torch.backends.cuda
        enabled = {
            "cudnn": cuda.cudnn_sdp_enabled(),
            "flash": cuda.flash_sdp_enabled(),
            "mem_efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(),
        }
        lines.append("  SDPA backends enabled: " + ", ".join(f"{k}={v}" for k, v in enabled.items()))
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    lines += [
        f"FlexAttention: {'available' if flex else 'not available'}; used by method='flex' and block-sparse",
        "flash-attn-4: "
        + _optional(
            "flash_attn", "flash-attn-4", used_by="backend 'flash_attn_4' (see below)", extra="flash4"
        ),
        f"flash-attn 2: {_optional('flash_attn_2_cuda', 'flash-attn', 'flash_attn')} "
        "(no backend of its own; xformers' dispatcher uses it where both are installed)",
        "nvidia-cudnn-frontend: "
        + _optional(
            "cudnn", "nvidia-cudnn-frontend", used_by="backend 'cudnn_frontend' (see below)", extra="cudnn"
        ),
        "xformers: "
        + _optional("xformers", "xformers", used_by="backend 'xformers' (see below)", extra="xformers"),
        "matplotlib: "
        + _optional("matplotlib", "matplotlib", used_by="visualize and benchmarks", extra="viz"),
        "",
        "kernel backends (registry order = preference):",
    ]
    for name, backend in kernels.REGISTRY.items():
        floor = (
            f" ('auto' from {backend.AUTO_MIN_TOKENS} query tokens per call)"
            if backend.AUTO_MIN_TOKENS
            else ""
        )
        lines.append(f"  {name}: {backend.description}{floor}")
    specs = [explain_auto(device="cpu", dtype=torch.float32)]
    if torch.cuda.is_available():
        specs.append(explain_auto(device="cuda", dtype=torch.bfloat16))
    lines.append("")
    for choice in specs:
        lines.append(choice.explain())
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
