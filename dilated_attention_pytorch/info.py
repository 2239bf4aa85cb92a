"""``python -m dilated_attention_pytorch.info``: the environment and what "auto" picks."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from . import __version__, kernels
from .factory import explain_auto


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _optional(import_name: str, *dist_names: str, used_by: str = "not used by this version") -> str:
    if importlib.util.find_spec(import_name) is None:
        return "not installed"
    return f"installed ({_dist_version(*dist_names) or 'version unknown'}); {used_by}"


def report() -> str:
    lines = [
        f"dilated_attention_pytorch {__version__}",
        f"torch {torch.__version__}",
        f"CUDA available: {torch.cuda.is_available()} (built with CUDA {torch.version.cuda})",
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
        + _optional("flash_attn", "flash-attn-4", used_by="backend 'flash_attn_4' (see below)"),
        f"flash-attn 2: {_optional('flash_attn_2_cuda', 'flash-attn', 'flash_attn')} "
        "(no backend of its own; xformers' dispatcher uses it where both are installed)",
        "xformers: " + _optional("xformers", "xformers", used_by="backend 'xformers' (see below)"),
        "",
        "kernel backends (registry order = preference):",
    ]
    for name, backend in kernels.REGISTRY.items():
        lines.append(f"  {name}: {backend.description}")
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
