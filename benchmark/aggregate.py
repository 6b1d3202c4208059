"""Aggregate run folders into the paper's metrics: IQM, median, mean and optimality gap of normalised scores, with
95% stratified bootstrap confidence intervals (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice").

    python benchmark/aggregate.py runs/* --out results/aggregate
    python benchmark/aggregate.py runs/* --out results/aggregate --group-by pooling scale

Each run folder's summary.json gives its script, args, env and score: the final iteration's mean training return
(as Dopamine reports its ALE runs), or the final evaluation where a script reports `eval_return` and no training
iterations count (Atari 100k, Procgen; not yet written). Atari scores are human-normalised, (score - random) / (human -
random), with the table rliable uses (benchmark/reference/atari_human_random.csv). A method is the script with its
args except seed, env and run control, or only the `--group-by` args; its label names the script and the args
that differ from the script's defaults, e.g. `rainbow_impala_gap pooling=flatten scale=4`.

Metrics over a score matrix (runs x games), as rliable defines them:
  iqm             mean of the middle 50% of all run-game scores (25% trimmed from each end)
  median, mean    of the per-game mean scores
  optimality_gap  1 - mean(min(score, 1))
Confidence intervals: resample runs with replacement within each game (stratified), --reps times, percentiles 2.5
and 97.5; reproducible for a given --seed.

Writes OUT/aggregate.csv (method, metric, value, ci_low, ci_high) and OUT/aggregate.md. Plots are still to come.
"""

import csv
import dataclasses
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import load_script  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
# args that do not change the experiment: never part of a method's label
RUN_CONTROL = {"seed", "env_id", "exp_name", "output_dir", "cuda", "compile", "cudagraphs", "save_model", "resume",
               "log_every", "progress_seconds", "checkpoint_every", "checkpoint_replay", "torch_deterministic",
               "eval_episodes", "diagnostics_every", "diagnostics_batch_size"}
METRICS = ["iqm", "median", "mean", "optimality_gap"]


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[List[str]]
    """run folders (each with a summary.json)"""
    out: str = "benchmark/results/aggregate"
    """folder for aggregate.csv and aggregate.md"""
    group_by: List[str] = field(default_factory=list)
    """the args that define a method (default: all but seed, env and run control)"""
    reps: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""


def iqm(scores: np.ndarray) -> float:
    flat = np.sort(scores.ravel())
    cut = int(0.25 * len(flat))  # scipy.stats.trim_mean(proportiontocut=0.25), as rliable
    return float(flat[cut:len(flat) - cut].mean())


def median(scores: np.ndarray) -> float:
    return float(np.median(scores.mean(axis=0)))


def mean(scores: np.ndarray) -> float:
    return float(scores.mean(axis=0).mean())


def optimality_gap(scores: np.ndarray, gamma: float = 1.0) -> float:
    return float(gamma - np.minimum(scores, gamma).mean())


METRIC_FUNCTIONS = dict(iqm=iqm, median=median, mean=mean, optimality_gap=optimality_gap)


def stratified_bootstrap(scores: np.ndarray, metric, reps: int, seed: int) -> tuple:
    """95% percentile interval of `metric` over resamples of the runs, drawn with replacement within each game."""
    rng = np.random.default_rng(seed)
    runs, games = scores.shape
    estimates = np.empty(reps)
    for r in range(reps):
        picks = rng.integers(0, runs, size=(runs, games))  # each game keeps its own number of runs
        estimates[r] = metric(np.take_along_axis(scores, picks, axis=0))
    return float(np.percentile(estimates, 2.5)), float(np.percentile(estimates, 97.5))


def human_random_table() -> Dict[str, tuple]:
    with open(os.path.join(REFERENCE, "atari_human_random.csv")) as f:
        return {row["game"].lower(): (float(row["random"]), float(row["human"])) for row in csv.DictReader(f)}


def game_name(env_id: str) -> str:
    """`Pong-v5`, `ALE/Pong-v5`, `PongNoFrameskip-v4` -> `pong`."""
    name = env_id.split("/")[-1].split(":")[-1]
    return re.sub(r"(NoFrameskip)?-v\d+$", "", name).lower()


def normalised_score(env_id: str, score: float, table: Dict[str, tuple]) -> float:
    game = game_name(env_id)
    if game not in table:
        raise SystemExit(f"error: no human/random reference score for '{env_id}' (game '{game}')")
    random_score, human_score = table[game]
    return (score - random_score) / (human_score - random_score)


def script_defaults(script: str) -> dict:
    try:
        return dataclasses.asdict(load_script(script).Args())
    except (FileNotFoundError, AttributeError):  # not one of cleanrl_gap/'s scripts: every arg is shown
        return {}


def method_label(summary: dict, group_by: List[str]) -> str:
    """The script and the args that define the method: the --group-by ones, or every experiment arg that differs
    from the script's default (so two runs share a label exactly when their experiment args are equal)."""
    args, script = summary["args"], os.path.splitext(summary["script"])[0]
    defaults = script_defaults(script)
    names = group_by or sorted(k for k in args if k not in RUN_CONTROL and (k not in defaults or args[k] != defaults[k]))
    return " ".join([script] + [f"{k}={args.get(k)}" for k in names])


def load_scores(run_dirs: List[str], group_by: List[str]) -> Dict[str, Dict[str, List[float]]]:
    """method -> game -> normalised scores, one a run."""
    table, scores = human_random_table(), defaultdict(lambda: defaultdict(list))
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "summary.json")
        if not os.path.isfile(path):
            print(f"skipping {run_dir}: no summary.json (unfinished or failed run)", file=sys.stderr)
            continue
        summary = json.load(open(path))
        score = summary.get("final_return")
        if score is None:
            score = summary.get("eval_return")
        if score is None:
            print(f"skipping {run_dir}: no final return in summary.json", file=sys.stderr)
            continue
        scores[method_label(summary, group_by)][game_name(summary["env_id"])].append(
            normalised_score(summary["env_id"], score, table))
    return scores


def score_matrix(by_game: Dict[str, List[float]]) -> np.ndarray:
    """(runs, games); games with fewer runs than the others are refused, as rliable needs a full matrix."""
    counts = {game: len(runs) for game, runs in by_game.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"error: games have different numbers of runs: {counts}")
    return np.array([by_game[game] for game in sorted(by_game)]).T


def aggregate(scores: Dict[str, Dict[str, List[float]]], reps: int, seed: int) -> List[dict]:
    rows = []
    for method in sorted(scores):
        matrix = score_matrix(scores[method])
        for metric in METRICS:
            low, high = stratified_bootstrap(matrix, METRIC_FUNCTIONS[metric], reps, seed)
            rows.append(dict(method=method, metric=metric, value=METRIC_FUNCTIONS[metric](matrix), ci_low=low,
                             ci_high=high, runs=matrix.shape[0], games=matrix.shape[1]))
    return rows


def main(args: Args) -> List[dict]:
    rows = aggregate(load_scores(args.run_dirs, args.group_by), args.reps, args.seed)
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
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
