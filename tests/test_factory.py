import pytest
import torch

from dilated_attention_pytorch import (
    DilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    explain_auto,
    kernels,
)


def test_bare_auto_builds_longnet_base_setting():
    m = create_multihead_dilated_attention("auto")
    assert isinstance(m, ImprovedMultiheadDilatedAttention)
    assert (m.embed_dim, m.num_heads) == (768, 12)
    assert m.attention.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert m.attention.dilation_rates == (1, 2, 4, 6, 12)
    assert m.batch_first is False
    assert "auto -> attention_type='improved'" in m.auto_choice.explain()
    assert create_multihead_dilated_attention().auto_choice is not None


def test_every_argument_can_be_overridden():
    m = create_multihead_dilated_attention(
        "standard",
        embed_dim=64,
        num_heads=4,
        segment_lengths=[8],
        dilation_rates=[2],
        batch_first=True,
        dropout=0.1,
    )
    assert isinstance(m, MultiheadDilatedAttention) and m.auto_choice is None
    assert (m.embed_dim, m.num_heads, m.batch_first, m.dropout) == (64, 4, True, 0.1)
    assert m.attention.segment_lengths == (8,)
    core = create_dilated_attention("improved", segment_lengths=[8], dilation_rates=[2], head_mode="all")
    assert isinstance(core, ImprovedDilatedAttention) and core.head_mode == "all"
    assert isinstance(create_dilated_attention("standard"), DilatedAttention)
    assert create_dilated_attention().segment_lengths == (2048, 4096, 8192, 16384, 32768)


@pytest.mark.parametrize("fn", [create_dilated_attention, create_multihead_dilated_attention])
def test_unknown_type_lists_the_valid_ones(fn):
    with pytest.raises(
        ValueError,
        match=r"attention_type must be one of \['auto', 'standard', 'improved', 'ring', "
        r"'block_sparse_ring'\]",
    ):
        fn("fastest")


@pytest.mark.parametrize(
    "kw,backend",
    [
        ({"device": "cpu", "dtype": torch.float32}, "sdpa_cpu_flash"),
        ({"device": "cpu", "dtype": torch.float64}, "sdpa_cpu_flash"),
        ({"device": "cuda", "dtype": torch.bfloat16, "compute_capability": (9, 0)}, "sdpa_cudnn"),
        (
            {"device": "cuda", "dtype": torch.bfloat16, "compute_capability": (9, 0), "head_dim": 256},
            "sdpa_flash",
        ),
        ({"device": "cuda", "dtype": torch.float16, "compute_capability": (8, 0)}, "sdpa_flash"),
        ({"device": "cuda", "dtype": torch.float32, "compute_capability": (9, 0)}, "sdpa_efficient"),
        (
            {"device": "cuda", "dtype": torch.bfloat16, "compute_capability": (9, 0), "has_mask": True},
            "sdpa_efficient",
        ),
        ({"device": "cuda", "dtype": torch.float16, "compute_capability": (7, 5)}, "sdpa_efficient"),
        ({"device": "cuda", "dtype": torch.float64, "compute_capability": (9, 0)}, "math"),
        ({"device": "cuda", "dtype": torch.bfloat16, "compute_capability": (9, 0), "head_dim": 12}, "math"),
    ],
)
def test_auto_backend_choice_from_metadata(kw, backend):
    choice = explain_auto(**kw)
    assert choice.attention_type == "improved"
    assert choice.backend == backend
    text = choice.explain()
    assert f"kernel backend={backend!r}" in text
    assert backend not in choice.rejected_backends
    # every other backend is listed with a reason
    assert len(choice.rejected_backends) == len(kernels.REGISTRY) - 1 and all(
        choice.rejected_backends.values()
    )


def test_auto_explains_why_each_type_lost():
    choice = explain_auto(device="cuda", dtype=torch.bfloat16, compute_capability=(8, 0), world_size=4)
    assert "world size is 4" in " ".join(choice.rejected_types["ring"])
    assert set(choice.rejected_types) == {"standard", "ring", "block_sparse_ring"}
    assert "needs compute capability >= (9, 0)" in " ".join(choice.rejected_backends["sdpa_cudnn"])


def test_auto_choice_describes_the_modules_own_calls():
    m = create_multihead_dilated_attention("auto", embed_dim=2048, num_heads=8, dtype=torch.float64)
    spec = m.auto_choice.spec
    assert (spec.head_dim, spec.dtype, spec.device_type) == (256, torch.float64, "cpu")
    assert "head_dim 256" in m.auto_choice.explain()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks about CUDA on a machine without it")
def test_explain_auto_about_cuda_without_cuda_says_it_is_hypothetical():
    choice = explain_auto(device="cuda", dtype=torch.bfloat16)
    assert choice.hypothetical is not None and "no usable CUDA device" in choice.hypothetical
    assert "compute_capability=(9, 0)" in choice.hypothetical
    assert "hypothetical: " in choice.explain()
    # a named GPU still says the answer is not about this machine, but no longer asks for the capability
    named = explain_auto(device="cuda", dtype=torch.bfloat16, compute_capability=(9, 0))
    assert named.hypothetical is not None and "compute_capability" not in named.hypothetical


def test_explain_auto_about_this_machine_is_not_hypothetical():
    assert explain_auto(device="cpu").hypothetical is None


def test_auto_explains_the_token_floor_of_its_backend(monkeypatch):
    from dilated_attention_pytorch.kernels import flash4

    monkeypatch.setattr(flash4, "installed_version", lambda: flash4.TESTED_VERSIONS[0])
    floor = flash4.Flash4Backend.AUTO_MIN_TOKENS
    kw = {"device": "cuda", "dtype": torch.bfloat16, "compute_capability": (9, 0)}
    any_size = explain_auto(**kw)
    assert any_size.backend == "flash_attn_4"
    assert f"note: calls of fewer than {floor} query tokens (batch·seq) run on 'sdpa_cudnn'" in (
        any_size.explain()
    )
    small = explain_auto(**kw, tokens=32768)
    assert small.backend == "sdpa_cudnn" and not small.notes
    assert f"'auto' takes it from {floor} query tokens" in small.rejected_backends["flash_attn_4"][0]
    assert explain_auto(**kw, tokens=floor).backend == "flash_attn_4"
