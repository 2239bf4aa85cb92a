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


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "dilated_attention_pytorch.info"], capture_output=True, text=True, check=True
    )
    assert "auto -> attention_type=" in result.stdout
