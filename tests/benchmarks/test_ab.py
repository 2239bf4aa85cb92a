"""``benchmarks/ab.py`` times two implementations: the base package's registered
operators must not replace this checkout's (one registration served both before)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, {benchmarks!r})
import torch
import ab
base = ab.load_base(ab.Path({root!r}))
head = ab.head
calls = []
for name, package in (("head", head), ("base", base)):
    ops = sys.modules[package.__name__ + ".core.ops"]
    real = ops.fused_forward
    ops.fused_forward = lambda *a, real=real, name=name: calls.append(name) or real(*a)
q = torch.randn(1, 64, 4, 8, dtype=torch.float64)
for package in (head, base, head):
    pattern = package.DilatedPattern([16, 32], [1, 2])
    out = package.functional.dilated_attention(q, q, q, pattern)
print(calls)
"""


def test_base_and_head_run_their_own_operators():
    code = PROBE.format(benchmarks=str(ROOT / "benchmarks"), root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['head', 'base', 'head']"


MULTIHEAD_PROBE = """
import sys
sys.path.insert(0, {benchmarks!r})
import torch
import ab
base = ab.load_base(ab.Path({root!r}))
x = torch.randn(1, 64, 16, dtype=torch.float64, requires_grad=True)
outs = []
for package in (ab.head, base):
    pattern = package.DilatedPattern([16, 32], [1, 2], "all")
    fwd, tensors = ab.multihead_calls((package, None), pattern, True, (x,), 4)
    params = list(package.ImprovedMultiheadDilatedAttention(16, 4).parameters())
    assert tensors[0] is x and len(tensors) == 1 + len(params)
    outs.append(fwd())
print(torch.equal(outs[0], outs[1]), tuple(outs[0].shape))
"""


def test_multihead_variants_share_weights_and_compute_the_same():
    """``--impl multihead``: each variant's module has the weights of one seed, so two
    checkouts of the same code give the same output."""
    code = MULTIHEAD_PROBE.format(benchmarks=str(ROOT / "benchmarks"), root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True (1, 64, 16)"


def _stand_in_compare(monkeypatch, host: bool) -> dict:
    """``ab.compare`` with timings that name the variant: base 4 ms, head 2 ms, host half."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ab

    now: dict[str, float] = {}

    def make_calls(variant, pattern):
        now["ms"] = 4.0 if variant[1] == "base_backend" else 2.0
        x = torch.ones(2, requires_grad=True)
        return (lambda: x * 1.0), (x,)

    monkeypatch.setattr(ab, "host_ms", lambda fn, calls: (fn(), now["ms"] / 2)[1])
    monkeypatch.setattr(ab, "peak_mib", lambda *args: None)
    monkeypatch.setattr(ab.torch.cuda, "get_device_name", lambda: "stand-in")
    variants = {"base": (ab.head, "base_backend"), "head": (ab.head, "head_backend")}
    record = {"workload": "W1", "head_mode": "grouped"}
    timer = lambda fn: (fn(), now["ms"])[1]  # noqa: E731
    return ab.compare(variants, make_calls, torch.ones(2), timer, 2, record, host)


def test_compare_records_each_timing_and_its_ratio(monkeypatch):
    record = _stand_in_compare(monkeypatch, host=False)
    assert (record["base_fwd_ms"], record["head_fwdbwd_ms"]) == (4.0, 2.0)
    assert (record["fwd_ratio"], record["fwdbwd_ratio"]) == (0.5, 0.5)
    assert not any("host" in key for key in record)
    assert record["backends"] == {"base": "base_backend", "head": "head_backend"}


def test_compare_with_host_records_the_host_times_too(monkeypatch):
    record = _stand_in_compare(monkeypatch, host=True)
    assert (record["base_host_fwd_ms"], record["head_host_fwdbwd_ms"]) == (2.0, 1.0)
    assert (record["host_fwd_ratio"], record["host_fwdbwd_ratio"]) == (0.5, 0.5)
