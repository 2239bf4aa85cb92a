import subprocess
import sys

import torch

from dilated_attention_pytorch import __version__
from dilated_attention_pytorch.info import report


def test_report_lists_environment_and_auto_choice():
    text = report()
    assert f"dilated_attention_pytorch {__version__}" in text
    assert f"torch {torch.__version__}" in text
    for name in (
        "sdpa_cudnn",
        "sdpa_flash",
        "sdpa_efficient",
        "sdpa_cpu_flash",
        "math",
        "flash-attn",
        "xformers",
    ):
        assert name in text
    assert "FlexAttention" in text
    assert "auto -> attention_type='improved'" in text
    assert "flash_attn_4: FlashAttention-4" in text and "('auto' from 131072 query tokens per call)" in text


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "dilated_attention_pytorch.info"], capture_output=True, text=True, check=True
    )
    assert "auto -> attention_type=" in result.stdout


def test_report_lists_platform_threads_versions_and_determinism():
    import platform

    text = report()
    assert f"Python {platform.python_version()}" in text
    assert platform.system() in text
    assert f"torch uses {torch.get_num_threads()} of" in text
    assert "einops " in text and "triton: " in text
    assert "determinism: torch.are_deterministic_algorithms_enabled()=" in text
    if torch.version.cuda is None:
        assert "CPU-only build of torch" in text and "built with CUDA None" not in text


def test_install_hints_name_this_distribution_and_its_extras(monkeypatch):
    import importlib.util

    from dilated_attention_pytorch import info

    real = importlib.util.find_spec
    monkeypatch.setattr(
        info.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("flash_attn", "xformers", "cudnn") else real(name, *a),
    )
    text = info.report()
    assert 'flash-attn-4: not installed (pip install "torch-dilated-attention[flash4]")' in text
    assert 'xformers: not installed (pip install "torch-dilated-attention[xformers]")' in text
    assert 'nvidia-cudnn-frontend: not installed (pip install "torch-dilated-attention[cudnn]")' in text
