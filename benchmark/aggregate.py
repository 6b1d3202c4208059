"""Aggregate runs into the paper's metrics: IQM, median, mean and optimality gap of normalised scores, with 95%
stratified bootstrap confidence intervals (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice").

    python benchmark/aggregate.py runs/sweep --out results/aggregate       # every run below a sweep's folder
    python benchmark/aggregate.py runs/sweep --out results/aggregate --group-by pooling scale

How runs are scored and normalised, what a method is, and the metrics' definitions: benchmark/metrics.py. A method is
the script with its args except seed, env and run control, or only the `--group-by` args; `--iteration K` scores
each run at iteration K instead of its last.

Writes OUT/aggregate.csv (method, metric, value, ci_low, ci_high), OUT/aggregate.md and, unless --no-plots, the
PNG plots of benchmark/plots.py (IQM against scale, IQM over training, GPU hours against IQM, the method comparison,
the diagnostics over training, per-game curves beside Dopamine's): a plot the runs cannot make is skipped with one
line saying why.
"""

import csv
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import plots  # noqa: E402
from benchmark.metrics import aggregate, find_run_dirs, load_runs, scores_by_method  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[List[str]]
    """run folders, or folders above them (a sweep's folder): every run with a summary.json below is aggregated"""
    out: str = "benchmark/results/aggregate"
    """folder for aggregate.csv and aggregate.md"""
    group_by: List[str] = field(default_factory=list)
    """the args that define a method (default: all but seed, env and run control)"""
    reps: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""
    plots: bool = True
    """draw the PNG plots next to aggregate.csv (`--no-plots`: the tables only)"""
    iteration: Optional[int] = None
    """score each run at this iteration (1 = the first) instead of its last, e.g. 100 for 100M frames of 200M-frame
    runs (Figure 10); runs without a return at that iteration are reported and skipped"""


def main(args: Args) -> List[dict]:
    if args.iteration is not None and args.iteration < 1:
        raise SystemExit(f"error: --iteration counts from 1, got {args.iteration}")
    runs = load_runs(find_run_dirs(args.run_dirs), args.group_by, args.iteration)
    rows = aggregate(scores_by_method(runs), args.reps, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "aggregate.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "metric", "value", "ci_low", "ci_high"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | metric | value | 95% CI | runs x games |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['metric']} | {r['value']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
              f"{r['runs']} x {r['games']} |" for r in rows]
    with open(os.path.join(args.out, "aggregate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.plots:
        plots.draw_all(runs, rows, args.out, args.reps, args.seed)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
