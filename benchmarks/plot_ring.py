"""Plot benchmarks/ring.py results: tokens/s per GPU and peak memory per GPU vs n.

    python benchmarks/plot_ring.py benchmarks/results/h200_ring_W1_p1.json \\
        benchmarks/results/h200_ring_W1_p2.json --output benchmarks/results/h200_ring_W1.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.results:
        records = [r for r in json.loads(path.read_text())["records"] if r["fits"]]
        world = records[0]["world"]
        n = [r["seq_len"] for r in records]
        speed.semilogx(
            n, [r["tokens_per_s_per_gpu"] / 1e6 for r in records], marker="o", label=f"{world} GPU"
        )
        memory.loglog(
            n, [r["peak_mem_mib_per_gpu"] / 1024 for r in records], marker="o", label=f"{world} GPU"
        )
    speed.set(xlabel="sequence length n", ylabel="M tokens/s per GPU (fwd+bwd)", ylim=(0, None))
    memory.set(xlabel="sequence length n", ylabel="peak GiB per GPU")
    for ax in (speed, memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
