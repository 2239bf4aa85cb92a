"""Markdown tables from benchmarks/run.py JSON (so docs never retype numbers).

python benchmarks/table.py benchmarks/results/h100_W1.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(records: list[dict]) -> str:
    rows = [
        "| n | head mode | causal | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
        "| fwd / best dense | fwd+bwd / best dense | peak / (qkv,out,grads) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: object, fmt: str = ".3g") -> str:
        return format(x, fmt) if isinstance(x, (int, float)) else "–"

    for r in records:
        if r["implementation"] not in ("improved", "baseline", "standard"):
            continue
        rows.append(
            f"| {r['seq_len']} | {r['head_mode']} | {'yes' if r['causal'] else 'no'} | {r['implementation']} "
            f"| {f(r.get('fwd_ms'))} | {f(r.get('fwdbwd_ms'))} | {f(r.get('tflops_fwd'), '.0f')} "
            f"| {f(r.get('tflops_fwdbwd'), '.0f')} | {f(r.get('ratio_to_dense_fwd'), '.2f')} "
            f"| {f(r.get('ratio_to_dense_fwdbwd'), '.2f')} | {f(r.get('peak_over_io'), '.2f')} |"
            + (f" {r['error']}" if r.get("error") else "")
        )
    return "\n".join(rows)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())))
