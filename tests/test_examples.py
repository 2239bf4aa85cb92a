"""The training example runs end to end on CPU at a tiny size and writes its outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_longnet_lm_tiny_cpu_run(tmp_path) -> None:
    example = _load("train_longnet_lm")
    result = example.main(
        ["--seq-len", "128", "--steps", "3", "--batch-size", "2", "--d-model", "32", "--heads", "4",
         "--segment-lengths", "16", "64", "--dilation-rates", "1", "2", "--eval-batches", "1",
         "--compare-dense", "64", "--repeats", "1", "--output-dir", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["losses"]) == 3 and all(loss > 0 for loss in saved["losses"])
    assert 0.0 <= saved["final_accuracy"] <= 1.0 and saved["chance_accuracy"] == 1 / 16
    assert saved["dense_comparison"][0]["dense"]["step_ms"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert result["config"]["seq_len"] == 128


def test_recall_task_plants_the_answer_in_the_first_quarter() -> None:
    import torch

    task = _load("train_longnet_lm").RecallTask(256, num_queries=8, needle_length=4)
    ids, answer = task.batch(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (ids[:, -8:] == task.query).all()
    for row, value in zip(ids, answer):
        where = (row == value).nonzero()[:, 0]
        assert len(where) == 4 and where.max() < 64 and (where.diff() == 1).all()


def test_hf_llama_example_tiny_cpu_run_and_reload(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    example = _load("hf_llama_dilated")
    result = example.main(
        ["--seq-len", "128", "--steps", "3", "--batch-size", "2", "--hidden-size", "32", "--heads", "4",
         "--kv-heads", "2", "--segment-lengths", "16", "64", "--dilation-rates", "1", "2",
         "--eval-batches", "1", "--save", "--output-dir", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["losses"]) == 3 and all(loss > 0 for loss in saved["losses"])
    assert saved["attn_implementation"] == "dilated" and result["chance_accuracy"] == 1 / 16
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", attn_implementation="dilated"
    )
    assert loaded.config.dilated_attention["segment_lengths"] == [16, 64]
    assert loaded(torch.zeros(1, 40, dtype=torch.long)).logits.isfinite().all()
