"""The benchmarks page's summary figures from one ``benchmarks/run.py`` JSON
(run with ``--impls improved baseline dense dense_full``): forward+backward time
and peak memory against the sequence length, for this library, the
gather-and-SDPA baseline, dense attention over the whole sequence, and the
dense kernel on the pattern's own sub-problems (the ceiling).

    python benchmarks/plot_summary.py benchmarks/results/h200_summary_W1.json \\
        --causal true --output-dir docs/images --prefix summary_h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SERIES = {
    "improved": "dilated attention (this library)",
    "baseline": "dilated, gather + SDPA per branch (typical implementation)",
    "dense_full": "dense attention over the whole sequence (SDPA)",
    "ceiling": "dense kernel on the same sub-problems (ceiling)",
}


def _series(records: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        name = r["implementation"]
        if name.startswith("dense_") and name != "dense_full":
            if metric != "fwdbwd_ms" or not r.get(metric):
                continue
            # the fastest dense backend at each length
            pts = dict(out.get("ceiling", []))
            pts[r["seq_len"]] = min(pts.get(r["seq_len"], float("inf")), r[metric])
            out["ceiling"] = sorted(pts.items())
        elif r.get(metric):
            out.setdefault(name, []).append((r["seq_len"], r[metric]))
    return {name: sorted(out[name]) for name in SERIES if name in out}


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a benchmarks/run.py JSON file")
    p.add_argument("--causal", choices=["true", "false"], default="true", help="which runs to draw")
    p.add_argument("--head-mode", choices=["grouped", "all"], default="grouped")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--prefix", default="summary", help="file names: PREFIX_time.png, PREFIX_memory.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        r
        for r in json.loads(args.results.read_text())
        if r["causal"] == (args.causal == "true") and r["head_mode"] == args.head_mode
    ]
    if not records:
        raise SystemExit(f"{args.results}: no records with causal={args.causal}, head_mode={args.head_mode}")
    r0 = records[0]
    title = (
        f"{r0['device']}, torch {r0['torch'].split('+')[0]}, {r0['dtype']}, batch {r0['batch']}, "
        f"{r0['num_heads']} heads x {r0['head_dim']}\n"
        f"segments {','.join(str(s // 1024) + 'K' for s in r0['segment_lengths'])}, "
        f"dilations {','.join(map(str, r0['dilation_rates']))}, {args.head_mode} heads, "
        f"{'causal' if args.causal == 'true' else 'no mask'}"
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, ylabel, scale, suffix in (
        ("fwdbwd_ms", "forward + backward time (ms)", 1.0, "time"),
        ("peak_mem_mib", "peak memory, forward + backward (GiB)", 1 / 1024, "memory"),
    ):
        fig, ax = plt.subplots(figsize=(8, 6.4))
        for name, pts in _series(records, metric).items():
            style = {"linestyle": "--"} if name in ("ceiling", "dense_full") else {}
            ax.loglog(
                [n for n, _ in pts],
                [v * scale for _, v in pts],
                marker="o",
                lw=2,
                label=SERIES[name],
                **style,
            )
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("sequence length (tokens)", fontsize=12)
        ax.set_ylabel(ylabel, fontsize=12)
        ax.tick_params(labelsize=11)
        ax.grid(True, which="both", alpha=0.3)
        # below the axes: inside, it would hide the lines it names
        ax.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
        fig.tight_layout()
        path = args.output_dir / f"{args.prefix}_{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
        print("wrote", path)
    return paths


if __name__ == "__main__":
    main()
