"""``benchmarks/profile_step.py`` sorts every GPU kernel of a step into a kind."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize(
    "kernel,kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
        ("_branches_kernel", "merge"),
        ("_place_kernel", "place"),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy"),
        # a contiguous copy_ is a device-to-device memcpy: GPU time of the step, not left out
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "fill"),
        ("Memset (Device)", "other"),
    ],
)
def test_kernels_are_sorted_by_kind(kernel, kind):
    pytest.importorskip("torch")
    from profile_step import kind_of

    assert kind_of(kernel) == kind
