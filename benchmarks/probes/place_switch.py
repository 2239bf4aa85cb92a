"""The grouped-head step with the region pass (``core.place_triton``, one Triton
launch per problem) against its torch fallback (a zero fill and a strided copy per
problem), in one process, alternating: eager and CUDA-graph-replayed GPU time
(CUDA events, median) and the host time of an eager call behind a GPU sleep. Says
from which length the pass pays for its launches.

    python benchmarks/probes/place_switch.py --workloads W1 W2 --seq-lens 32768 131072 \\
        --output place_switch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST_CALLS, Timer, host_ms
from host_time import steps

from dilated_attention_pytorch.core import place_triton


@contextmanager
def region_pass(on: bool) -> Iterator[None]:
    """With ``on`` False, :func:`~dilated_attention_pytorch.core.place.place_result`
    takes its torch fallback."""
    kept = place_triton.can_place
    if not on:
        place_triton.can_place = lambda *_: False  # type: ignore[assignment]
    try:
        yield
    finally:
        place_triton.can_place = kept  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["W1", "W2"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="sdpa_cudnn")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    eager, graphed = Timer(torch.device("cuda"), 3, 15), Timer(torch.device("cuda"), 3, 15, cuda_graph=True)
    rows: list[dict[str, Any]] = []
    for workload in args.workloads:
        for n in args.seq_lens:
            for causal in (c == "true" for c in args.causal):
                fns = steps(workload, n, "grouped", causal, args.backend)
                for on in (True, False) * args.rounds:
                    row: dict[str, Any] = {"workload": workload, "n": n, "causal": causal, "region_pass": on}
                    with region_pass(on):
                        for name, fn in fns.items():
                            row[f"{name}_gpu_ms"] = eager(fn)
                            row[f"{name}_graph_ms"] = graphed(fn)
                            row[f"{name}_host_ms"] = host_ms(fn, HOST_CALLS[name])
                    rows.append(row)
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.output.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
