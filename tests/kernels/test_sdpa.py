"""The SDPA backends' own helpers (their numerics are tested through the fused path)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dilated_attention_pytorch.kernels import sdpa


@pytest.fixture(autouse=True)
def _fresh_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdpa, "_NO_RNG", {})


def test_the_philox_placeholder_is_made_once_per_device() -> None:
    cpu = torch.device("cpu")
    first = sdpa._no_rng(cpu)
    assert first.shape == () and first.dtype == torch.int64 and first.item() == 0
    assert sdpa._no_rng(cpu) is first
    replay = sdpa.EfficientBackend().replay_state(40, cpu)
    assert replay[0] is first and replay[1] is first and replay[2] == 64


def test_a_placeholder_made_during_a_graph_capture_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # it would live in the capturing graph's private pool
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    meta = torch.device("meta")
    made = sdpa._no_rng(meta)  # a device of type cuda is not needed: meta is never captured
    assert sdpa._NO_RNG == {meta: made}
    sdpa._NO_RNG.clear()
    monkeypatch.setattr(
        sdpa.torch, "zeros", lambda *a, **kw: torch.empty((), dtype=torch.int64, device="meta")
    )
    cuda = torch.device("cuda", 0)
    assert sdpa._no_rng(cuda).device.type == "meta"
    assert sdpa._no_rng(cuda) is not sdpa._no_rng(cuda)
    assert sdpa._NO_RNG == {}


def test_a_fake_placeholder_is_not_kept() -> None:
    with FakeTensorMode():
        sdpa._no_rng(torch.device("cpu"))
    assert sdpa._NO_RNG == {}
    assert type(sdpa._no_rng(torch.device("cpu"))) is torch.Tensor
