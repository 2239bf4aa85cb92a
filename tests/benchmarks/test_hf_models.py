"""benchmarks/hf_models.py runs end to end on CPU with a tiny config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_its_record(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("hf_models", ROOT / "benchmarks" / "hf_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "hf.json"
    module.main(["--device", "cpu", "--small", "--lengths", "64", "--context", "80", "--new-tokens", "4",
                 "--repeats", "1", "--output", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    row = record["train"][0]
    assert row["seq_len"] == 64 and row["dilated"]["step_ms"] > 0 and row["sdpa"]["step_ms"] > 0
    assert record["generate"]["dilated_constant_cache"]["cache"] == "DilatedCache"
    for name in ("dilated", "sdpa", "dilated_constant_cache"):
        generated = record["generate"][name]
        assert generated["decode_tokens_per_s"] > 0 and generated["cache_bytes_per_context_token"] > 0
