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
