"""The paper's metrics and the runs they are computed on, for aggregate.py (tables) and plots.py (figures).

Runs: the run folders at or below given folders (find_run_dirs), each with its summary.json, script, args and score
(load_runs): the final iteration's mean training return (as Dopamine reports its ALE runs), or, for scripts that
evaluate after every iteration (`eval_by_iteration`: DER on Atari 100k, Procgen), the final evaluation, as those
benchmarks report. Atari scores are human-normalised, (score - random) / (human - random), with the table rliable uses
(benchmark/reference/atari_human_random.csv); Procgen scores are min-max normalised, (score - min) / (max - min), with
the ranges of the distribution mode each run played (its `distribution_mode` arg: easy or hard; Cobbe et al. 2020,
benchmark/reference/procgen_norm.csv). A method is the script with its args except seed, env and run control, or
only the group-by args; its label names the script and the args that differ from the script's defaults, e.g.
`rainbow_impala_gap pooling=flatten scale=4`.

Metrics over a score matrix (runs x games), as rliable defines them (Agarwal et al. 2021):
  iqm             mean of the middle 50% of all run-game scores (25% trimmed from each end)
  median, mean    of the per-game mean scores
  optimality_gap  1 - mean(min(score, 1))
Confidence intervals: resample runs with replacement within each game (stratified), `reps` times, percentiles 2.5
and 97.5; reproducible for a given seed.
"""

import csv
import dataclasses
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import load_script  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
# args that do not change the experiment: never part of a method's label
RUN_CONTROL = {
    "seed",
    "env_id",
    "exp_name",
    "output_dir",
    "cuda",
    "compile",
    "cudagraphs",
    "save_model",
    "resume",
    "log_every",
    "progress_seconds",
    "checkpoint_every",
    "checkpoint_replay",
    "torch_deterministic",
    "eval_episodes",
    "diagnostics_every",
    "diagnostics_batch_size",
}
METRICS = ["iqm", "median", "mean", "optimality_gap"]


def iqm(scores: np.ndarray) -> float:
    flat = np.sort(scores.ravel())
    cut = int(0.25 * len(flat))  # scipy.stats.trim_mean(proportiontocut=0.25), as rliable
    return float(flat[cut : len(flat) - cut].mean())


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


PROCGEN_MODES = ("easy", "hard")  # the distribution modes procgen_norm.csv has ranges for


def atari_random_and_human() -> Dict[str, tuple]:
    """game -> (random score, human score), the table rliable uses."""
    with open(os.path.join(REFERENCE, "atari_human_random.csv")) as f:
        return {row["game"].lower(): (float(row["random"]), float(row["human"])) for row in csv.DictReader(f)}


def reference_table(distribution_mode: str = "easy") -> Dict[str, tuple]:
    """game -> (score normalised to 0, score normalised to 1): Atari's random and human scores, and Procgen's minimum
    and maximum returns in `distribution_mode`, one of PROCGEN_MODES (Cobbe et al. 2020)."""
    table = atari_random_and_human()
    low, high = f"{distribution_mode}_min", f"{distribution_mode}_max"
    with open(os.path.join(REFERENCE, "procgen_norm.csv")) as f:
        table.update({row["game"]: (float(row[low]), float(row[high])) for row in csv.DictReader(f)})
    return table


def game_name(env_id: str) -> str:
    """`Pong-v5`, `ALE/Pong-v5`, `PongNoFrameskip-v4` -> `pong`."""
    name = env_id.split("/")[-1].split(":")[-1]
    return re.sub(r"(NoFrameskip)?-v\d+$", "", name).lower()


def normalised_score(env_id: str, score: float, table: Dict[str, tuple]) -> float:
    game = game_name(env_id)
    if game not in table:
        raise SystemExit(f"error: no reference scores (human/random or Procgen range) for '{env_id}' (game '{game}')")
    low, high = table[game]
    return (score - low) / (high - low)


def script_defaults(script: str) -> dict:
    try:
        return dataclasses.asdict(load_script(script).Args())
    except (FileNotFoundError, AttributeError):  # not one of cleanrl_gap/'s scripts: every arg is shown
        return {}


def method_label(summary: dict, group_by: List[str], drop: Sequence[str] = ()) -> str:
    """The script and the args that define the method: the --group-by ones, or every experiment arg that differs
    from the script's default (so two runs share a label exactly when their experiment args are equal); the `drop`
    args left out (e.g. `scale`, to put a method's scales on one line)."""
    args, script = summary["args"], os.path.splitext(summary["script"])[0]
    defaults = script_defaults(script)
    names = group_by or sorted(k for k in args if k not in RUN_CONTROL and (k not in defaults or args[k] != defaults[k]))
    return " ".join([script] + [f"{k}={args.get(k)}" for k in names if k not in drop])


@dataclass
class Run:
    """A finished run: its folder and summary.json, its method, game and normalised scores."""

    folder: str
    summary: dict
    method: str
    family: str  # the method without its scale
    game: str
    score: float  # the final one, normalised, as aggregated
    raw_score: float  # the same before normalisation
    curve: List[tuple]  # (frames, normalised mean training return or nan), one an iteration

    @property
    def args(self) -> dict:
        return self.summary["args"]


def frames_per_step(summary: dict) -> float:
    if summary.get("env_steps"):
        return summary["frames"] / summary["env_steps"]
    return summary["args"].get("frame_skip", 4)


def find_run_dirs(paths: List[str]) -> List[str]:
    """Run folders at or below `paths`, in sorted order: a folder with a summary.json, or an unfinished run's (a
    checkpoint.pt or a log.txt without one), which load_runs then reports. A sweep's folder works as it is given."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f"error: {path} is not a folder")
        below = []
        for folder, subfolders, files in os.walk(path):
            if "summary.json" in files or "checkpoint.pt" in files:
                below.append(folder)
                subfolders.clear()  # a run folder holds no other runs
            elif "log.txt" in files and not subfolders:  # a sweep's run that stopped before its first checkpoint
                below.append(folder)
        if not below:
            print(f"skipping {path}: no run folder at or below it (unfinished or failed run)", file=sys.stderr)
        found += sorted(below)
    if not found:
        raise SystemExit(f"error: no run folders (with a summary.json) at or below {' '.join(paths)}")
    return found


def load_runs(run_dirs: List[str], group_by: List[str], iteration: Optional[int] = None) -> List[Run]:
    """The runs with a summary.json and a final score (or a score at `iteration`, their curves cut there); the
    others are reported and skipped. A Procgen run is normalised with the ranges of the distribution mode it played
    (easy when its args do not say: the ALE scripts have no such arg)."""
    tables, runs = {mode: reference_table(mode) for mode in PROCGEN_MODES}, []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "summary.json")
        if not os.path.isfile(path):
            print(f"skipping {run_dir}: no summary.json (unfinished or failed run)", file=sys.stderr)
            continue
        summary = json.load(open(path))
        evaluated = "eval_by_iteration" in summary  # DER and Procgen report their evaluations, as those benchmarks do
        score = summary.get("eval_return" if evaluated else "final_return")
        points = summary.get("eval_by_iteration" if evaluated else "returns_by_iteration", [])
        if iteration is not None:
            points = points[:iteration]
            score = points[-1]["mean_return"] if len(points) == iteration else None
        if score is None:
            missing = "final return" if iteration is None else f"return at iteration {iteration}"
            print(f"skipping {run_dir}: no {missing} in summary.json", file=sys.stderr)
            continue
        env_id, skip = summary["env_id"], frames_per_step(summary)
        mode = summary["args"].get("distribution_mode", "easy")
        if mode not in tables:
            raise SystemExit(
                f"error: {run_dir} played Procgen's '{mode}' distribution mode, which has no ranges in "
                f"procgen_norm.csv (only {', '.join(PROCGEN_MODES)})"
            )
        table = tables[mode]
        curve = [
            (
                point["step"] * skip,
                float("nan") if point["mean_return"] is None else normalised_score(env_id, point["mean_return"], table),
            )
            for point in points
        ]
        runs.append(
            Run(
                run_dir,
                summary,
                method_label(summary, group_by),
                method_label(summary, group_by, ["scale"]),
                game_name(env_id),
                normalised_score(env_id, score, table),
                score,
                curve,
            )
        )
    return runs


def scores_by_method(runs: List[Run]) -> Dict[str, Dict[str, List[float]]]:
    """method -> game -> normalised scores, one a run."""
    scores = defaultdict(lambda: defaultdict(list))
    for run in runs:
        scores[run.method][run.game].append(run.score)
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
            rows.append(
                dict(
                    method=method,
                    metric=metric,
                    value=METRIC_FUNCTIONS[metric](matrix),
                    ci_low=low,
                    ci_high=high,
                    runs=matrix.shape[0],
                    games=matrix.shape[1],
                )
            )
    return rows


def per_game(runs: List[Run]) -> List[dict]:
    """One row a method and game: its number of runs, their mean raw score and their mean normalised score."""
    by_method_and_game = defaultdict(list)
    for run in runs:
        by_method_and_game[(run.method, run.game)].append(run)
    rows = []
    for (method, game), game_runs in sorted(by_method_and_game.items()):
        raw = float(np.mean([run.raw_score for run in game_runs]))
        normalised = float(np.mean([run.score for run in game_runs]))
        rows.append(dict(method=method, game=game, runs=len(game_runs), score=raw, normalised=normalised))
    return rows


def published_scores(path: str) -> Tuple[str, Dict[str, float]]:
    """A CSV of published per-game scores: its `game` column and its first other column, e.g. DER's Atari 100k
    table (benchmark/reference/der_atari100k.csv: game,der_score,hns) -> ("der_score", {"alien": 739.9, ...})."""
    with open(path) as f:
        reader = csv.DictReader(f)
        column = next(name for name in reader.fieldnames if name != "game")
        return column, {row["game"].lower(): float(row[column]) for row in reader}


def random_play_scores(path: str) -> Dict[str, float]:
    """benchmark/random_play.py's JSON (game -> its measurement): game -> mean return of uniform random play."""
    with open(path) as f:
        return {game.lower(): measured["mean_return"] for game, measured in json.load(f).items()}


def published_aggregate(published: Dict[str, float], games: List[str]) -> Optional[Dict[str, float]]:
    """The metrics of published per-game scores (one score a game, normalised with the same table as ours) over
    `games`, the games a method of ours played, so the two aggregates compare like with like; None when a game has
    no published score."""
    if any(game not in published for game in games):
        return None
    table = atari_random_and_human()
    matrix = np.array([[normalised_score(game, published[game], table) for game in sorted(games)]])
    return {metric: METRIC_FUNCTIONS[metric](matrix) for metric in METRICS}
