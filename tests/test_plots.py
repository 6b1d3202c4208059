"""benchmark/plots.py: the data behind each plot against hand computations on synthetic run folders, and every PNG
written (or skipped with a reason) by benchmark/aggregate.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmark import aggregate, metrics, plots
from benchmark.scripts import ROOT

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
PNGS = [
    "iqm_vs_scale.png",
    "iqm_over_training.png",
    "gpu_hours_vs_iqm.png",
    "iqm_vs_psi_parameters.png",
    "method_comparison.png",
    "diagnostics.png",
    "dopamine_curves.png",
]
ITERATION = 250_000


def write_run(folder, game, seed, fractions, diagnostics=None, wall_seconds=3600.0, counts=None, **args):
    """A finished flagship run whose iteration k scores fractions[k] human-normalised (None: no episode ended);
    diagnostics: tag -> values, one an iteration, written as TensorBoard scalars; counts: summary fields such as
    params_psi."""
    random_score, human_score = metrics.reference_table()[game.lower()]
    returns = [
        dict(
            step=ITERATION * (k + 1),
            episodes=0 if f is None else 3,
            mean_return=None if f is None else random_score + f * (human_score - random_score),
        )
        for k, f in enumerate(fractions)
    ]
    env_id = f"{game}-v5"
    summary = dict(
        script="rainbow_impala_gap.py",
        env_id=env_id,
        seed=seed,
        env_steps=ITERATION * len(fractions),
        frames=4 * ITERATION * len(fractions),
        wall_seconds=wall_seconds,
        device="cuda",
        returns_by_iteration=returns,
        final_return=returns[-1]["mean_return"],
        args=dict(seed=seed, env_id=env_id, output_dir="runs", frame_skip=4, **args),
        **(counts or {}),
    )
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    if diagnostics:
        writer = SummaryWriter(folder)
        for tag, values in diagnostics.items():
            for k, value in enumerate(values):
                writer.add_scalar(tag, value, ITERATION * (k + 1))
        writer.close()
    return str(folder)


def test_iqm_over_training_is_the_iqm_of_each_iteration(tmp_path):
    fractions = {
        ("Pong", 0): [0.1, 0.5, 0.9],
        ("Pong", 1): [0.2, None, 1.1],
        ("Pong", 2): [0.0, 0.4, 0.7],
        ("Breakout", 0): [0.3, 0.6, 2.0],
        ("Breakout", 1): [-0.1, 0.2, 0.8],
        ("Breakout", 2): [0.05, 0.3, 1.5],
    }
    folders = [
        write_run(tmp_path / f"{game}{seed}", game, seed, f, pooling="flatten", scale=4)
        for (game, seed), f in fractions.items()
    ]
    runs = metrics.load_runs(folders, [])
    curves = plots.iqm_over_training(runs, reps=200, seed=0)
    assert list(curves) == ["rainbow_impala_gap pooling=flatten scale=4"]
    curve = curves["rainbow_impala_gap pooling=flatten scale=4"]
    # iteration 1 is left out: one run ended no episode in it; frames are agent steps x frame skip 4
    assert curve["frames"] == [4 * ITERATION, 12 * ITERATION]
    for point, k in enumerate([0, 2]):
        values = sorted(f[k] for f in fractions.values())  # 6 values: the IQM drops int(0.25 * 6) = 1 at each end
        assert curve["iqm"][point] == pytest.approx(np.mean(values[1:5]))
        assert curve["low"][point] <= curve["iqm"][point] <= curve["high"][point]
    assert curves == plots.iqm_over_training(runs, reps=200, seed=0)  # reproducible


def test_iqm_by_scale_puts_a_methods_scales_on_one_line(tmp_path):
    folders, expected = [], {}
    for pooling in ["flatten", "gap"]:
        for scale in [1, 2, 4]:
            scores = []
            for game in ["Pong", "Breakout"]:
                for seed in range(2):
                    f = 0.1 * scale + (0.5 if pooling == "gap" else 0.0) + 0.03 * seed + (0.2 if game == "Pong" else 0)
                    folders.append(
                        write_run(
                            tmp_path / f"{pooling}{scale}{game}{seed}", game, seed, [0.0, f], pooling=pooling, scale=scale
                        )
                    )
                    scores.append(f)
            expected[(pooling, scale)] = metrics.iqm(np.array(scores))
    lines = plots.iqm_by_scale(metrics.load_runs(folders, []), reps=100, seed=0)
    # gap is the flagship's default pooling: its label has no args left once the scale is dropped
    assert lines.keys() == {"rainbow_impala_gap", "rainbow_impala_gap pooling=flatten"}
    for label, pooling in [("rainbow_impala_gap", "gap"), ("rainbow_impala_gap pooling=flatten", "flatten")]:
        assert sorted(lines[label]) == [1, 2, 4]
        for scale, (value, low, high) in lines[label].items():
            assert value == pytest.approx(expected[(pooling, scale)])
            assert low <= value <= high


def test_diagnostics_are_averaged_over_a_methods_runs(tmp_path):
    phi, psi, norm = plots.DIAGNOSTICS
    folders = [
        write_run(tmp_path / "a", "Pong", 0, [0.1, 0.2], {phi: [0.0, 0.1], psi: [0.2, 0.4], norm: [3.0, 5.0]}),
        write_run(tmp_path / "b", "Pong", 1, [0.1, 0.2], {phi: [0.2, 0.3], psi: [0.4, 0.8], norm: [1.0, 2.0]}),
        write_run(tmp_path / "c", "Pong", 0, [0.1, 0.2], pooling="flatten"),
    ]  # no events: no curves
    by_method = plots.diagnostics_by_method(metrics.load_runs(folders, []))
    assert list(by_method) == ["rainbow_impala_gap"]
    curves = by_method["rainbow_impala_gap"]
    assert curves[phi] == ([4 * ITERATION, 8 * ITERATION], [pytest.approx(0.1), pytest.approx(0.2)])  # in frames
    assert curves[psi][1] == [pytest.approx(0.3), pytest.approx(0.6)]
    assert curves[norm][1] == [pytest.approx(2.0), pytest.approx(3.5)]


def test_dopamine_reference_holds_the_papers_20_games():
    from benchmark.sweep import GAME_SETS

    reference = plots.dopamine_reference()
    assert set(reference) == {game.lower() for game in GAME_SETS["paper20"]}
    for game, variants in reference.items():
        assert set(variants) == set(plots.DOPAMINE_VARIANTS)
        for curve in variants.values():
            assert curve["frames"] == list(range(1, 201))  # iteration i ends at (i + 1)M frames
            assert all(lo <= m <= hi for lo, m, hi in zip(curve["min"], curve["mean"], curve["max"]))


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data.startswith(PNG_HEADER), path


def test_psi_parameters_prefer_the_effective_count_and_average_over_runs(tmp_path):
    """Figure 5 (right): x is the mean over a method's runs of params_psi_effective (pruned runs) or params_psi."""
    folders = []
    for seed, (dense, effective) in enumerate([(1000, 100), (1000, 300)]):
        for game in ["Pong", "Breakout"]:
            folders.append(
                write_run(
                    tmp_path / f"pruned{game}{seed}",
                    game,
                    seed,
                    [0.2 + 0.1 * seed],
                    counts=dict(params_psi=dense, params_psi_effective=effective),
                    pooling="flatten",
                )
            )
            folders.append(
                write_run(
                    tmp_path / f"dense{game}{seed}",
                    game,
                    seed,
                    [0.5 + 0.1 * seed],
                    counts=dict(params_psi=2000 + seed),
                    scale=2,
                )
            )
    folders.append(write_run(tmp_path / "old", "Pong", 0, [0.9], scale=8))  # no count recorded: left out
    runs = metrics.load_runs(folders, [])
    rows = metrics.aggregate(metrics.scores_by_method(runs), reps=50, seed=0)
    points = plots.psi_parameters(runs, rows)
    iqm = {row["method"]: row["value"] for row in rows if row["metric"] == "iqm"}
    assert points.keys() == {"rainbow_impala_gap pooling=flatten", "rainbow_impala_gap scale=2"}
    for method, mean_count in [("rainbow_impala_gap pooling=flatten", 200.0), ("rainbow_impala_gap scale=2", 2000.5)]:
        assert points[method][:2] == pytest.approx((mean_count, iqm[method]))


def test_aggregate_draws_every_plot(tmp_path):
    phi, psi, norm = plots.DIAGNOSTICS
    folders = []
    for pooling in ["flatten", "gap"]:
        for scale in [1, 4]:
            for game in ["Pong", "Breakout"]:
                for seed in range(2):
                    level = 0.2 * scale + (0.5 if pooling == "gap" else 0.0) + 0.1 * seed
                    folders.append(
                        write_run(
                            tmp_path / "runs" / f"{game}_{pooling}_{scale}_{seed}",
                            game,
                            seed,
                            [0.0, level / 2, level],
                            {phi: [0.01, 0.02, 0.03], psi: [0.1, 0.2, 0.3], norm: [1.0, 2.0, 4.0]},
                            wall_seconds=3600.0 * scale,
                            counts=dict(params_psi=(3872 if pooling == "flatten" else 32) * 512 * scale),
                            pooling=pooling,
                            scale=scale,
                        )
                    )
    out = tmp_path / "out"
    rows = aggregate.main(aggregate.Args(run_dirs=folders, out=str(out), reps=100))
    assert len(rows) == 4 * len(metrics.METRICS)
    for name in PNGS:
        assert_png(out / name)
    assert (out / "aggregate.csv").is_file() and (out / "aggregate.md").is_file()


def run_aggregate(folders, out, *flags):
    """Exit status, stderr and the plots reported skipped of `python benchmark/aggregate.py FOLDERS --out OUT`."""
    result = subprocess.run(
        [sys.executable, "benchmark/aggregate.py", *folders, "--out", str(out), "--reps", "50", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    skipped = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("plot ") and "skipped" in line}
    return result.returncode, result.stderr, skipped


def test_no_scores_skip_every_plot_with_a_reason(tmp_path):
    # the last iteration ended no episode, so no run has a final return: no scores, no plot, and no crash
    folders = [
        write_run(tmp_path / "runs" / f"Pong{seed}", "Pong", seed, [0.1 * seed, None], pooling="flatten") for seed in range(3)
    ]
    out = tmp_path / "out"
    code, stderr, skipped = run_aggregate(folders, out)
    assert code == 0, stderr
    assert stderr.count("no final return") == 3
    assert skipped == {
        "iqm_vs_scale",
        "iqm_over_training",
        "gpu_hours_vs_iqm",
        "iqm_vs_psi_parameters",
        "method_comparison",
        "diagnostics",
        "dopamine_curves",
        "evaluation_curves",
    }
    assert not any(name.endswith(".png") for name in os.listdir(out))


def test_one_scale_and_no_events_skip_only_their_plots(tmp_path):
    folders = [
        write_run(tmp_path / "runs" / f"{game}{seed}", game, seed, [0.1, None, 0.3 + 0.1 * seed], pooling="flatten", scale=4)
        for game in ["Pong", "Breakout"]
        for seed in range(3)
    ]
    out = tmp_path / "out"
    code, stderr, skipped = run_aggregate(folders, out)
    assert code == 0, stderr
    # no params_psi in these summaries, and the flagship does not evaluate after its iterations
    assert skipped == {"iqm_vs_scale", "diagnostics", "iqm_vs_psi_parameters", "evaluation_curves"}
    for name in set(PNGS) - {"iqm_vs_scale.png", "diagnostics.png", "iqm_vs_psi_parameters.png"}:
        assert_png(out / name)
    code, stderr, skipped = run_aggregate(folders, tmp_path / "tables", "--no-plots")
    assert code == 0 and not skipped, stderr
    assert sorted(os.listdir(tmp_path / "tables")) == ["aggregate.csv", "aggregate.md", "per_game.csv"]


def write_der_run(folder, game, seed, eval_returns, **args):
    """A finished DER run evaluated after each of its 10k-step iterations, with these mean evaluation returns."""
    evaluations = [dict(step=10_000 * (k + 1), mean_return=r, episodes=100) for k, r in enumerate(eval_returns)]
    env_id = f"{game}-v5"
    summary = dict(
        script="der_atari100k_gap.py",
        env_id=env_id,
        seed=seed,
        env_steps=10_000 * len(eval_returns),
        frames=4 * 10_000 * len(eval_returns),
        returns_by_iteration=[dict(step=p["step"], mean_return=0.0, episodes=1) for p in evaluations],
        final_return=0.0,
        eval_by_iteration=evaluations,
        eval_return=eval_returns[-1],
        args=dict(seed=seed, env_id=env_id, output_dir="runs", frame_skip=4, **args),
    )
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    return str(folder)


def test_evaluation_curves_per_game_and_method(tmp_path):
    """Per game and method: frames of each evaluation (steps x frame skip), the mean, min and max over the runs of the
    evaluation returns; a run with fewer evaluations cuts its method's curve to the ones every run reached."""
    folders = [
        write_der_run(tmp_path / "flatten1", "Pong", 1, [-21.0, -15.0, -9.0], pooling="flatten", scale=4),
        write_der_run(tmp_path / "flatten2", "Pong", 2, [-19.0, -11.0], pooling="flatten", scale=4),
        write_der_run(tmp_path / "gap1", "Pong", 1, [-20.0, -10.0, 0.0], pooling="gap", scale=4),
    ]
    runs = metrics.load_runs(folders, ["pooling"])
    curves = plots.evaluation_curves(runs)
    flatten = curves["pong"]["der_atari100k_gap pooling=flatten"]
    assert flatten["frames"] == pytest.approx([0.04, 0.08])
    assert flatten["mean"] == pytest.approx([-20.0, -13.0])
    assert flatten["low"] == pytest.approx([-21.0, -15.0]) and flatten["high"] == pytest.approx([-19.0, -11.0])
    assert flatten["runs"] == 2
    gap = curves["pong"]["der_atari100k_gap pooling=gap"]
    assert gap["mean"] == pytest.approx([-20.0, -10.0, 0.0]) and gap["runs"] == 1
    assert_png(plots.draw_evaluation_curves(runs, str(tmp_path), published={"pong": -3.0}))
