"""The sequence-parallel benchmark scripts run under torchrun on CPU (gloo, 2
ranks, every strategy) and write complete records: benchmarks/ring.py (the
core and the module, with the profiled overlap) and benchmarks/sp_exactness.py
(every strategy within the bf16 rule's ratio of one device)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["all_gather", "ring", "ulysses", "hybrid"]
#: a branch whose segments span both ranks (64 > 64 / 2), shared key/value heads
SMALL = ["--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
         "--segment-lengths", "8", "64", "--dilation-rates", "1", "2", "--seq-lens", "64"]  # fmt: skip


def _torchrun(script: str, *args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / script),
        *args,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks")


@pytest.mark.slow
@pytest.mark.parametrize("module", [False, True], ids=["core", "module"])
def test_ring_benchmark_records_every_strategy(tmp_path, module):
    out, profile = tmp_path / "ring.json", tmp_path / "profile.json"
    extra = ["--module"] if module else ["--profile", str(profile)]
    _torchrun("benchmarks/ring.py", *SMALL, "--exchange", *STRATEGIES, "--warmup", "1", "--repeats", "2",
              "--output", str(out), *extra)  # fmt: skip
    records = json.loads(out.read_text())["records"]
    assert [r["exchange"] for r in records] == STRATEGIES
    for r in records:
        assert r["fits"] and r["module"] == module and r["world"] == 2 and r["tokens_per_gpu"] == 32
        assert r["fwdbwd_ms"] > 0 and r["tokens_per_s_per_gpu"] > 0
        if not module:
            assert [x["rank"] for x in r["communication_overlap"]] == [0, 1]
    if not module:
        assert set(json.loads(profile.read_text())) == {f"{x} 64" for x in STRATEGIES}


def test_overlap_share_counts_communication_covered_by_compute(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from ring import overlap_share

    # compute [0, 4] and [6, 10] (merged from overlapping pieces); communication [3, 7] and [11, 12]
    assert overlap_share([(3, 7), (11, 12)], [(0, 2), (1, 4), (6, 10)]) == pytest.approx(2 / 5)
    assert overlap_share([], [(0, 1)]) is None


@pytest.mark.slow
def test_exactness_script_passes_every_strategy(tmp_path):
    out = tmp_path / "exact.json"
    _torchrun("benchmarks/sp_exactness.py", *SMALL, "--output", str(out))
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 * 2 * len(STRATEGIES)  # head modes x causal x strategies
    for r in records:
        assert r["passes"], r
        for name in ("out", "dq", "dk", "dv"):
            assert 0 < r[name]["sharded_error"] < 1e-5 and 0 < r[name]["one_gpu_error"] < 1e-5
