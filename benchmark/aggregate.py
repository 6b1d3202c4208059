"""Aggregate runs into the paper's metrics: IQM, median, mean and optimality gap of normalised scores, with 95%
stratified bootstrap confidence intervals (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice").

    python benchmark/aggregate.py runs/sweep --out results/aggregate       # every run below a sweep's folder
    python benchmark/aggregate.py runs/sweep --out results/aggregate --group-by pooling scale

How runs are scored and normalised, what a method is, and the metrics' definitions: benchmark/metrics.py. A method is
the script with its args except seed, env and run control, or only the `--group-by` args; `--iteration K` scores
each run at iteration K instead of its last.

    python benchmark/aggregate.py docs/results/der100k --published benchmark/reference/der_atari100k.csv \
        --random-play docs/results/random_play.json                       # Atari 100k beside DER's published scores

Writes OUT/aggregate.csv (method, metric, value, ci_low, ci_high), OUT/per_game.csv (method, game, runs, score,
normalised), OUT/aggregate.md (both tables: the aggregate one with, given --published, the published scores' metrics
on the same games; the per-game one with the reference scores beside ours) and, unless --no-plots, the PNG plots of
benchmark/plots.py (IQM against scale, IQM over training, GPU hours against IQM, the method comparison, the
diagnostics over training, per-game curves beside Dopamine's, evaluation curves): a plot the runs cannot make is
skipped with one line saying why.
"""

import csv
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import plots  # noqa: E402
from benchmark.metrics import (  # noqa: E402
    aggregate,
    atari_random_and_human,
    find_run_dirs,
    load_runs,
    per_game,
    published_aggregate,
    published_scores,
    random_play_scores,
    scores_by_method,
)


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[List[str]]
    """run folders, or folders above them (a sweep's folder): every run with a summary.json below is aggregated"""
    out: str = "benchmark/results/aggregate"
    """folder for aggregate.csv, per_game.csv and aggregate.md"""
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
    published: Optional[str] = None
    """a CSV of published per-game scores (a `game` column, then the score column), shown beside ours, e.g.
    benchmark/reference/der_atari100k.csv"""
    random_play: Optional[str] = None
    """benchmark/random_play.py's JSON: uniform random play through our env wrapper, shown beside the table's random
    score (a control: a wrapper problem shows as a gap between the two)"""


def number(value: Optional[float]) -> str:
    """Scores as a table shows them: one decimal, thousands separated; a missing one as a dash."""
    return "-" if value is None else f"{value:,.1f}"


def markdown_tables(rows: List[dict], games: List[dict], args: Args, published_name: str, published: dict) -> List[str]:
    """The aggregate metrics with their intervals, then the per-game scores beside the reference ones: the table's
    random and human scores and, when given, the published scores (`published`, game -> score, from the CSV's
    `published_name` column) and our random play."""
    lines = ["| method | metric | value | 95% CI | runs x games |", "|---|---|---|---|---|"]
    for r in rows:
        interval = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(f"| {r['method']} | {r['metric']} | {r['value']:.3f} | {interval} | {r['runs']} x {r['games']} |")
    if args.published:  # the published scores' metrics on each method's games, beside ours
        for method in sorted({r["method"] for r in rows}):
            method_games = sorted({g["game"] for g in games if g["method"] == method})
            published_metrics = published_aggregate(published, method_games)
            if published_metrics is None:  # a game without a published score: no like-for-like aggregate
                continue
            label = f"{published_name} (published) on the games of {method}"
            for metric, value in published_metrics.items():
                lines.append(f"| {label} | {metric} | {value:.3f} | - | 1 x {len(method_games)} |")
    atari = atari_random_and_human()  # Procgen games have no random or human score: dashes
    header = ["method", "game", "runs", "score", "normalised", "random", "human"]
    if args.published:
        header.append(published_name)
    if args.random_play:
        random_play = random_play_scores(args.random_play)
        header.append("random play (ours)")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in games:
        random_score, human_score = atari.get(g["game"], (None, None))
        cells = [g["method"], g["game"], str(g["runs"]), number(g["score"]), f"{g['normalised']:.3f}"]
        cells += [number(random_score), number(human_score)]
        if args.published:
            cells.append(number(published.get(g["game"])))
        if args.random_play:
            cells.append(number(random_play.get(g["game"])))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
    games = per_game(runs)
    with open(os.path.join(args.out, "per_game.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "game", "runs", "score", "normalised"])
        writer.writeheader()
        writer.writerows(games)
    published_name, published = published_scores(args.published) if args.published else ("", {})
    lines = markdown_tables(rows, games, args, published_name, published)
    with open(os.path.join(args.out, "aggregate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.plots:
        plots.draw_all(runs, rows, args.out, args.reps, args.seed, published)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
