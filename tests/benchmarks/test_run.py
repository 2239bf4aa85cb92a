"""The benchmark CLI runs on CPU in --quick mode and writes complete records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_run_writes_records(tmp_path):
    out = tmp_path / "quick.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/run.py"),
            "--quick",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--head-modes",
            "grouped",
            "all",
            "--causal",
            "false",
            "true",
            "--impls",
            "improved",
            "standard",
            "baseline",
            "dense",
            "multihead",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = json.loads(out.read_text())
    impls = {r["implementation"] for r in records}
    assert {"improved", "standard", "baseline", "dense_math", "multihead"} <= impls
    assert any(i.startswith("dense_large_") for i in impls), impls
    for r in records:
        for key in (
            "device",
            "dtype",
            "batch",
            "seq_len",
            "num_heads",
            "head_dim",
            "segment_lengths",
            "dilation_rates",
            "head_mode",
            "causal",
            "fwd_ms",
            "fwdbwd_ms",
            "tflops_fwd",
            "backend",
        ):
            assert key in r, (r["implementation"], key)
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        impl = r["implementation"]
        if impl == "improved":
            assert r["ratio_to_large_dense_fwd"] > 0 and r["ratio_to_large_dense_fwdbwd"] > 0
        if impl in ("improved", "standard", "baseline"):
            assert r["ratio_to_dense_fwd"] > 0
            assert r["best_dense_fwd"] == r["best_dense_fwdbwd"] == "math"
        elif impl == "multihead":  # the core's time over the module's, projections included
            assert 0 < r["attention_share_fwd"] and 0 < r["attention_share_fwdbwd"]
        elif impl.startswith("dense_large_"):
            assert r["shape"] == [2, 2, 256] and r["tflops_fwdbwd"] > 0
        else:
            # the total is the problems' times weighted by how often each shape occurs
            problems = r["problems"]
            assert problems and all(p["count"] >= 1 for p in problems)
            assert (
                abs(sum(p["count"] * p["fwd_ms"] for p in problems) - r["fwd_ms"])
                < 1e-9 * r["fwd_ms"] + 1e-12
            )
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/table.py"), str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert table.count("| improved |") == 8  # 2 lengths x 2 head modes x causal or not
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import plot

    names = {p.name for p in plot(records, tmp_path / "plots")}
    for metric in ("fwdbwd_ms", "ratio_to_dense_fwdbwd", "ratio_to_dense_fwd"):
        for mode in ("grouped", "all"):
            for mask in ("full", "causal"):
                assert f"{metric}_{mode}_{mask}.png" in names


def test_dense_ceiling_times_registry_kernels_directly():
    """A registry kernel as dense ceiling (how FlashAttention-4 is timed where installed): its
    forward returns the kernel's output and lse, its forward+backward runs the kernel's backward."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from run import _dense_problem_fns

    for causal in (False, True):
        fwd, fwd_bwd = _dense_problem_fns(
            "sdpa_cpu_flash", (2, 3, 16), 8, causal, torch.device("cpu"), torch.float32
        )
        out, lse, _ = fwd()
        assert out.shape == (2, 3, 16, 8) and lse.shape == (2, 3, 16)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        fwd_bwd()


def test_baseline_matches_reference_in_grouped_mode():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from baseline import baseline_dilated_attention

    from dilated_attention_pytorch.reference import dilated_attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 21, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        out = baseline_dilated_attention(q, k, v, (6, 16, 5), (1, 3, 2), causal)
        exp = dilated_attention_reference(q, k, v, (6, 16, 5), (1, 3, 2), is_causal=causal)
        torch.testing.assert_close(out, exp)


def test_block_sparse_quick_cpu_run(tmp_path):
    out = tmp_path / "bs.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/block_sparse.py"),
            "--quick",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = json.loads(out.read_text())
    assert [r["seq_len"] for r in records] == [512, 1024]
    for r in records:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["dense_best_fwd_ms"] > 0
        # the layout keeps about 10% of the pairs, and the tiles cover at least those
        assert 0.85 < r["layout_sparsity"] < 0.95
        assert r["tile_pairs"] >= r["allowed_pairs"] > 0


def test_decode_benchmark_runs_on_cpu(tmp_path) -> None:
    from benchmarks.decode import main

    out = tmp_path / "decode.json"
    main(["--device", "cpu", "--contexts", "16", "40", "--steps", "3", "--d-model", "32", "--heads", "4",
          "--layers", "1", "--output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    rows = {(r["pattern"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {("dilated", 16), ("dilated", 40), ("dense", 16), ("dense", 40)}
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    # the dilated cache has a fixed size; the dense one is a full-window cache
    assert rows["dilated", 16]["cache_mib"] == rows["dilated", 40]["cache_mib"]


def test_each_peak_sees_only_its_own_configurations_inputs(monkeypatch):
    """Every peak counts what is live: a configuration's q, k, v (and their gradients)
    must be gone before the next configuration, and before the multihead module's
    step, is measured (closures of the last step held them)."""
    import weakref

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    seen: list[weakref.ref] = []
    stale: list[int] = []

    def peak_mib(device, fn, inputs):
        stale.append(sum(ref() is not None and ref() is not inputs[0] for ref in seen))
        seen.append(weakref.ref(inputs[0]))
        return None

    monkeypatch.setattr(run, "peak_mib", peak_mib)
    args = run.parse_args(
        [
            "--quick",
            "--device",
            "cpu",
            "--seq-lens",
            "64",
            "128",
            "--impls",
            "improved",
            "standard",
            "multihead",
        ]
    )
    run.run(args)
    assert len(stale) >= 2 * 5  # per length: fwd and fwd+bwd of two impls, and the module
    assert stale == [0] * len(stale), stale
