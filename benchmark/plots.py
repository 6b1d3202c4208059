"""The paper's plots from aggregated runs, drawn by `python benchmark/aggregate.py RUN_DIRS --out OUT` (matplotlib,
Agg backend) as OUT/*.png next to aggregate.csv. Scores are human-normalised as in benchmark/metrics.py, and every
interval is its 95% stratified bootstrap over runs (Agarwal et al. 2021).

  iqm_vs_scale.png       Figure 6 (left): IQM of the final scores against the `scale` arg, one line per method
                         without its scale
  iqm_over_training.png  sample efficiency: at each iteration index, the IQM over runs x games of the normalised
                         mean training returns of that iteration, against frames
  gpu_hours_vs_iqm.png   Figure 9: mean wall-clock hours of a run (one game) against IQM, labelled with the device
  iqm_vs_psi_parameters.png
                         Figure 5 (right): IQM against the effective weights of psi (its layers and heads): the
                         non-zero ones for the pruned script at the end of its runs, all of them for the others
  method_comparison.png  Figure 10: median, IQM and mean with their intervals, one row per method
  diagnostics.png        Figures 2 and 7: dormant fractions of phi and psi and the bottleneck feature norm over
                         training (TensorBoard scalars), mean over a method's runs
  dopamine_curves.png    per game, the flagship's mean training return per iteration (mean and min-max over seeds)
                         beside Dopamine's published JAX Rainbow, Impala and Nature CNN (mean and min-max over 5
                         seeds; benchmark/reference/dopamine_rainbow_curves.csv, the 20 games of the paper)
  evaluation_curves.png  per game, the evaluation return after each iteration (DER on Atari 100k, Procgen), one line
                         per method (mean, min-max over runs), the published score (aggregate.py --published) dashed

A plot the runs cannot make (one scale only, no TensorBoard diagnostics, no flagship run on a reference game...) is
skipped with one printed line saying why.
"""

import csv
import math
import os
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from benchmark.metrics import REFERENCE, Run, frames_per_step, iqm, score_matrix, stratified_bootstrap  # noqa: E402

DIAGNOSTICS = {
    "diagnostics/dormant_fraction_phi": "dormant fraction of phi",
    "diagnostics/dormant_fraction_psi": "dormant fraction of psi",
    "diagnostics/bottleneck_feature_norm": "bottleneck feature norm",
}
DOPAMINE_VARIANTS = {"jax_impala": "Dopamine Rainbow, Impala", "jax_nature_cnn": "Dopamine Rainbow, Nature CNN"}
FLAGSHIP = "rainbow_impala_gap.py"
CURVE_REPS = 500  # bootstrap resamples at each point of a training curve (hundreds of points)


def skip(name: str, why: str) -> None:
    print(f"plot {name} skipped: {why}")


def iqm_with_interval(by_game: Dict[str, List[float]], reps: int, seed: int) -> Optional[tuple]:
    """(IQM, low, high) of a game -> scores table, or None where games have different numbers of runs."""
    try:
        matrix = score_matrix(by_game)
    except SystemExit:
        return None
    return (iqm(matrix), *stratified_bootstrap(matrix, iqm, reps, seed))


def group(runs: List[Run], key) -> Dict[str, List[Run]]:
    groups = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return dict(sorted(groups.items()))


def iqm_over_training(runs: List[Run], reps: int, seed: int) -> Dict[str, dict]:
    """method -> frames, iqm, low, high: at each iteration index, the IQM over the method's runs x games of the
    normalised iteration returns. An index where some run has no value (shorter run, or no episode ended in that
    iteration) is left out, so every point covers the same runs."""
    curves = {}
    for method, members in group(runs, lambda run: run.method).items():
        points = []
        for k in range(max(len(run.curve) for run in members)):
            if any(len(run.curve) <= k or math.isnan(run.curve[k][1]) for run in members):
                continue
            by_game = defaultdict(list)
            for run in members:
                by_game[run.game].append(run.curve[k][1])
            estimate = iqm_with_interval(by_game, reps, seed)
            if estimate is not None:
                points.append((float(np.mean([run.curve[k][0] for run in members])), *estimate))
        if points:
            curves[method] = dict(zip(["frames", "iqm", "low", "high"], map(list, zip(*points))))
    return curves


def iqm_by_scale(runs: List[Run], reps: int, seed: int) -> Dict[str, Dict[float, tuple]]:
    """method without scale -> scale -> (IQM, low, high) of the final scores."""
    lines = {}
    for family, members in group([run for run in runs if "scale" in run.args], lambda run: run.family).items():
        by_scale = {}
        for scale, at_scale in group(members, lambda run: run.args["scale"]).items():
            by_game = defaultdict(list)
            for run in at_scale:
                by_game[run.game].append(run.score)
            estimate = iqm_with_interval(by_game, reps, seed)
            if estimate is not None:
                by_scale[scale] = estimate
        lines[family] = by_scale
    return lines


def read_scalars(folder: str, tags) -> Dict[str, List[tuple]]:
    """tag -> [(step, value)] from the TensorBoard event files of a run folder (no files: empty)."""
    if not any(name.startswith("events.out.tfevents") for name in os.listdir(folder)):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    present = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present}


def diagnostics_by_method(runs: List[Run]) -> Dict[str, Dict[str, tuple]]:
    """method -> tag -> (frames, mean over the method's runs that logged that step); TensorBoard steps are agent
    steps, times the run's frame skip."""
    result = {}
    for method, members in group(runs, lambda run: run.method).items():
        values = defaultdict(lambda: defaultdict(list))
        for run in members:
            for tag, points in read_scalars(run.folder, DIAGNOSTICS).items():
                for step, value in points:
                    values[tag][step * frames_per_step(run.summary)].append(value)
        if values:
            result[method] = {
                tag: (sorted(by_step), [float(np.mean(by_step[s])) for s in sorted(by_step)])
                for tag, by_step in values.items()
            }
    return result


def dopamine_reference() -> Dict[str, Dict[str, dict]]:
    """game -> variant -> frames (millions, end of each 1M-frame iteration), mean, min, max."""
    table = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with open(os.path.join(REFERENCE, "dopamine_rainbow_curves.csv")) as f:
        for row in csv.DictReader(f):
            curve = table[row["game_lower"]][row["variant"]]
            curve["frames"].append(int(row["iteration"]) + 1)
            for name, column in [("mean", "mean_train_return"), ("min", "min_seed"), ("max", "max_seed")]:
                curve[name].append(float(row[column]))
    return table


def save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"plot {path}")
    return path


def draw_iqm_over_training(runs: List[Run], out: str, reps: int, seed: int) -> Optional[str]:
    curves = iqm_over_training(runs, min(reps, CURVE_REPS), seed)
    if not curves:
        return skip(
            "iqm_over_training", "no method has an iteration with a return in every run (and as many runs in every game)"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, curve in curves.items():
        frames = np.array(curve["frames"]) / 1e6
        (line,) = ax.plot(frames, curve["iqm"], marker="." if len(frames) < 30 else None, label=method)
        ax.fill_between(frames, curve["low"], curve["high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="frames (millions)", ylabel="IQM human-normalised score", title="IQM over training (95% CI)")
    ax.legend(fontsize=7)
    return save(fig, out, "iqm_over_training.png")


def draw_iqm_vs_scale(runs: List[Run], out: str, reps: int, seed: int) -> Optional[str]:
    lines = {family: by_scale for family, by_scale in iqm_by_scale(runs, reps, seed).items() if len(by_scale) > 1}
    if not lines:
        return skip("iqm_vs_scale", "no method was run at more than one --scale")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for family, by_scale in lines.items():
        scales = sorted(by_scale)
        value, low, high = (np.array([by_scale[s][i] for s in scales]) for i in range(3))
        ax.errorbar(scales, value, yerr=[value - low, high - value], marker="o", capsize=3, label=family)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({s for by_scale in lines.values() for s in by_scale}))
    ax.get_xaxis().set_major_formatter(ScalarFormatter())
    ax.set(xlabel="scale (width of psi x 512)", ylabel="IQM human-normalised score", title="IQM against scale (95% CI)")
    ax.legend(fontsize=7)
    return save(fig, out, "iqm_vs_scale.png")


def iqm_rows_by_method(rows: List[dict]) -> Dict[str, dict]:
    return {row["method"]: row for row in rows if row["metric"] == "iqm"}


def plot_iqm_point(ax, x: float, value: float, low: float, high: float, label: str):
    """One method's IQM at x with its 95% interval."""
    ax.errorbar([x], [value], yerr=[[value - low], [high - value]], marker="o", capsize=3, label=label)


def draw_gpu_hours(runs: List[Run], rows: List[dict], out: str) -> Optional[str]:
    iqm_rows = iqm_rows_by_method(rows)
    timed = group([run for run in runs if run.summary.get("wall_seconds") and run.method in iqm_rows], lambda run: run.method)
    if not timed:
        return skip("gpu_hours_vs_iqm", "no run records wall_seconds")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, members in timed.items():
        hours = float(np.mean([run.summary["wall_seconds"] for run in members])) / 3600
        row = iqm_rows[method]
        plot_iqm_point(ax, hours, row["value"], row["ci_low"], row["ci_high"], method)
        devices = ", ".join(sorted({str(run.summary.get("device", "?")) for run in members}))
        ax.annotate(devices, (hours, row["value"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set(
        xlabel="hours per run (one game), mean over runs",
        ylabel="IQM human-normalised score",
        title="Compute against performance",
    )
    ax.legend(fontsize=7)
    return save(fig, out, "gpu_hours_vs_iqm.png")


def psi_parameters(runs: List[Run], rows: List[dict]) -> Dict[str, tuple]:
    """method -> (mean effective weights of psi over its runs, IQM, low, high), for methods whose runs all record
    them (summary.json's params_psi_effective, else params_psi)."""
    iqm_rows = iqm_rows_by_method(rows)
    points = {}
    for method, members in group(runs, lambda run: run.method).items():
        counts = [run.summary.get("params_psi_effective", run.summary.get("params_psi")) for run in members]
        if method in iqm_rows and None not in counts:
            row = iqm_rows[method]
            points[method] = (float(np.mean(counts)), row["value"], row["ci_low"], row["ci_high"])
    return points


def draw_iqm_vs_psi_parameters(runs: List[Run], rows: List[dict], out: str) -> Optional[str]:
    points = psi_parameters(runs, rows)
    if not points:
        return skip("iqm_vs_psi_parameters", "no run records params_psi (runs made before it was added to summary.json)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (count, *interval) in points.items():  # interval: the IQM and its CI ends
        plot_iqm_point(ax, count, *interval, method)
    ax.set_xscale("log")
    ax.set(
        xlabel="effective weights of psi (non-zero, layers and heads)",
        ylabel="IQM human-normalised score",
        title="Performance against the effective size of psi (95% CI)",
    )
    ax.legend(fontsize=7)
    return save(fig, out, "iqm_vs_psi_parameters.png")


def draw_method_comparison(rows: List[dict], out: str) -> Optional[str]:
    if not rows:
        return skip("method_comparison", "no method to compare")
    methods = sorted({row["method"] for row in rows})
    by_key = {(row["method"], row["metric"]): row for row in rows}
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.45 * len(methods)), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ["median", "iqm", "mean"]):
        for i, method in enumerate(methods):
            row = by_key[(method, metric)]
            color = colors[i % len(colors)]
            ax.plot([row["ci_low"], row["ci_high"]], [i, i], linewidth=8, alpha=0.5, color=color, solid_capstyle="butt")
            ax.plot([row["value"]], [i], marker="|", markersize=14, color="black")
        ax.set_title(metric.upper() if metric == "iqm" else metric.capitalize())
        ax.set_xlabel("human-normalised score")
    axes[0].set_yticks(range(len(methods)), methods, fontsize=7)
    return save(fig, out, "method_comparison.png")


def draw_diagnostics(runs: List[Run], out: str) -> Optional[str]:
    by_method = diagnostics_by_method(runs)
    if not by_method:
        return skip("diagnostics", "no run folder holds TensorBoard diagnostics scalars")
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(5 * len(DIAGNOSTICS), 4))
    for method, curves in by_method.items():
        for ax, tag in zip(axes, DIAGNOSTICS):
            if tag in curves:
                frames, values = curves[tag]
                ax.plot(np.array(frames) / 1e6, values, label=method)
    for ax, title in zip(axes, DIAGNOSTICS.values()):
        ax.set(xlabel="frames (millions)", title=title)
    axes[0].legend(fontsize=7)
    return save(fig, out, "diagnostics.png")


def game_grid(games: List[str]):
    """A figure with one panel per game, at most four a row."""
    cols = min(4, len(games))
    rows = math.ceil(len(games) / cols)
    return plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)


def finish_game_grid(fig, axes, games: List[str]) -> None:
    """Hides the panels left over and draws one legend above them all, each label once."""
    for ax in axes.ravel()[len(games) :]:
        ax.axis("off")
    legend = {}
    for ax in axes.ravel():
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels()) if label not in legend})
    fig.legend(legend.values(), legend.keys(), loc="lower center", fontsize=8, ncol=2, bbox_to_anchor=(0.5, 1.0))


def draw_dopamine_curves(runs: List[Run], out: str) -> Optional[str]:
    reference = dopamine_reference()
    ours = [run for run in runs if run.summary["script"] == FLAGSHIP and run.game in reference]
    if not ours:
        return skip("dopamine_curves", f"no {FLAGSHIP} run on a game of the Dopamine reference (the paper's 20)")
    games = sorted({run.game for run in ours})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(DOPAMINE_VARIANTS, ["black", "gray"]))  # the same colour for a curve in every game
    colors.update({method: palette[i % len(palette)] for i, method in enumerate(sorted({run.method for run in ours}))})
    fig, axes = game_grid(games)
    for ax, game in zip(axes.ravel(), games):
        for variant, label in DOPAMINE_VARIANTS.items():
            curve = reference[game].get(variant)
            if curve:
                ax.plot(curve["frames"], curve["mean"], linestyle="--", color=colors[variant], label=label)
                ax.fill_between(curve["frames"], curve["min"], curve["max"], color=colors[variant], alpha=0.15)
        for method, members in group([run for run in ours if run.game == game], lambda run: run.method).items():
            length = min(len(run.curve) for run in members)  # the iterations every seed reached
            if length == 0:
                continue
            returns = np.array(
                [
                    [
                        np.nan if p["mean_return"] is None else p["mean_return"]
                        for p in run.summary["returns_by_iteration"][:length]
                    ]
                    for run in members
                ]
            )
            frames = np.array([run.curve[:length] for run in members])[:, :, 0].mean(0) / 1e6
            with warnings.catch_warnings():  # an iteration where no seed ended an episode stays a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                low, mean, high = np.nanmin(returns, 0), np.nanmean(returns, 0), np.nanmax(returns, 0)
            ax.plot(frames, mean, marker="." if length < 30 else None, color=colors[method], label=method)
            ax.fill_between(frames, low, high, color=colors[method], alpha=0.2)
        ax.set(title=game, xlabel="frames (millions)", ylabel="mean training return")
    finish_game_grid(fig, axes, games)
    return save(fig, out, "dopamine_curves.png")


def evaluation_curves(runs: List[Run]) -> Dict[str, Dict[str, dict]]:
    """game -> method -> frames (millions), the mean evaluation return after each iteration over the method's runs,
    their min and max, and the number of runs: the iterations every run of the method reached, for runs that evaluate
    after their iterations (`eval_by_iteration` in summary.json: DER on Atari 100k, Procgen)."""
    curves = defaultdict(dict)
    evaluated = [run for run in runs if run.summary.get("eval_by_iteration")]
    for (game, method), members in group(evaluated, lambda run: (run.game, run.method)).items():
        length = min(len(run.summary["eval_by_iteration"]) for run in members)
        returns = np.array([[p["mean_return"] for p in run.summary["eval_by_iteration"][:length]] for run in members])
        frames = [
            p["step"] * frames_per_step(members[0].summary) / 1e6 for p in members[0].summary["eval_by_iteration"][:length]
        ]
        curves[game][method] = dict(
            frames=frames, mean=returns.mean(0), low=returns.min(0), high=returns.max(0), runs=len(members)
        )
    return curves


def draw_evaluation_curves(runs: List[Run], out: str, published: Optional[Dict[str, float]] = None) -> Optional[str]:
    """Per game, each method's evaluation return after every iteration: the mean over its runs, their min-max when
    there are several, and the published score (e.g. DER's) as a dashed line."""
    curves = evaluation_curves(runs)
    if not curves:
        return skip("evaluation_curves", "no run evaluates after its iterations (eval_by_iteration in summary.json)")
    games = sorted(curves)
    methods = sorted({method for by_method in curves.values() for method in by_method})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    fig, axes = game_grid(games)
    for ax, game in zip(axes.ravel(), games):
        for method, curve in sorted(curves[game].items()):
            label = f"{method} ({curve['runs']} run{'s' if curve['runs'] > 1 else ''})"
            ax.plot(curve["frames"], curve["mean"], marker=".", color=colors[method], label=label)
            if curve["runs"] > 1:
                ax.fill_between(curve["frames"], curve["low"], curve["high"], color=colors[method], alpha=0.2)
        if published and game in published:
            ax.axhline(published[game], linestyle="--", color="black", label="published")
        ax.set(title=game, xlabel="frames (millions)", ylabel="evaluation return")
    finish_game_grid(fig, axes, games)
    return save(fig, out, "evaluation_curves.png")


def draw_all(
    runs: List[Run], rows: List[dict], out: str, reps: int, seed: int, published: Optional[Dict[str, float]] = None
) -> List[str]:
    """Every plot the runs can make, the published per-game scores (game -> score) beside the evaluation curves;
    returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = [
        draw_iqm_vs_scale(runs, out, reps, seed),
        draw_iqm_over_training(runs, out, reps, seed),
        draw_gpu_hours(runs, rows, out),
        draw_iqm_vs_psi_parameters(runs, rows, out),
        draw_method_comparison(rows, out),
        draw_diagnostics(runs, out),
        draw_dopamine_curves(runs, out),
        draw_evaluation_curves(runs, out, published),
    ]
    return [path for path in paths if path]
