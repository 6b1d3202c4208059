"""benchmark/metrics.py and benchmark/aggregate.py: the metrics against their definitions (rliable's), the stratified
bootstrap, and the whole path from run folders to aggregate.csv."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmark import aggregate, metrics
from benchmark.scripts import ROOT, load_script

PROCGEN = (
    "bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot "
    "heist jumper leaper maze miner ninja plunder starpilot"
).split()


def test_metrics_match_their_definitions():
    scores = np.array([[0.1, 2.0, -0.5], [0.4, 1.0, 0.3], [0.2, 3.0, 0.9], [0.8, 0.5, 1.5]])  # 4 runs x 3 games
    flat = sorted(scores.ravel().tolist())  # 12 values: the IQM drops 3 from each end
    assert metrics.iqm(scores) == pytest.approx(sum(flat[3:9]) / 6)
    game_means = [(0.1 + 0.4 + 0.2 + 0.8) / 4, (2.0 + 1.0 + 3.0 + 0.5) / 4, (-0.5 + 0.3 + 0.9 + 1.5) / 4]
    assert metrics.median(scores) == pytest.approx(sorted(game_means)[1])
    assert metrics.mean(scores) == pytest.approx(sum(game_means) / 3)
    clipped = [min(v, 1.0) for v in scores.ravel()]
    assert metrics.optimality_gap(scores) == pytest.approx(1 - sum(clipped) / 12)


def test_bootstrap_is_stratified_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 4)) + np.arange(4)  # games differ in level
    seen = []

    def recording_mean(sample):
        seen.append(sample)
        return metrics.mean(sample)

    low, high = metrics.stratified_bootstrap(scores, recording_mean, reps=300, seed=7)
    assert len(seen) == 300
    for sample in seen:  # every resampled column holds runs of its own game only, as many as it had
        assert sample.shape == scores.shape
        assert all(set(sample[:, g]) <= set(scores[:, g]) for g in range(4))

    # stratified: each game draws its own runs, so a row of a sample mixes runs (resampling whole runs would keep each
    # row one run). The scores are distinct, so each value names its run.
    def run_of(game, value):
        return int(np.flatnonzero(scores[:, game] == value)[0])

    rows_of_one_run = 0
    for sample in seen:
        for row in sample:
            rows_of_one_run += len({run_of(g, row[g]) for g in range(4)}) == 1
    assert rows_of_one_run / (300 * 5) < 0.05  # independent draws: 5 * (1/5)^4 = 0.008; whole runs: 1
    assert low <= metrics.mean(scores) <= high
    assert metrics.stratified_bootstrap(scores, metrics.mean, 300, 7) == (low, high)
    assert metrics.stratified_bootstrap(scores, metrics.mean, 300, 8) != (low, high)
    constant = np.tile(np.array([[0.5, 1.5, 2.0]]), (4, 1))  # identical runs: nothing to resample
    point = metrics.iqm(constant)
    assert metrics.stratified_bootstrap(constant, metrics.iqm, 50, 0) == pytest.approx((point, point))


def test_game_names_and_normalisation():
    table = metrics.reference_table()
    assert len(table) == 57 + 16
    assert metrics.normalised_score("bigfish", 20.5, table) == pytest.approx(0.5)  # easy range [1, 40]
    assert metrics.normalised_score("coinrun", 5.0, table) == pytest.approx(0.0)  # easy range [5, 10]
    for env_id in ["Pong-v5", "ALE/Pong-v5", "PongNoFrameskip-v4"]:
        assert metrics.game_name(env_id) == "pong"
    random_score, human_score = table["pong"]
    assert metrics.normalised_score("Pong-v5", human_score, table) == pytest.approx(1.0)
    assert metrics.normalised_score("ALE/Pong-v5", random_score, table) == pytest.approx(0.0)
    with pytest.raises(SystemExit):
        metrics.normalised_score("toy_envs.catch:Catch-v0", 1.0, table)
    hard = metrics.reference_table("hard")
    assert hard["starpilot"] == (1.5, 35.0) and table["starpilot"] == (2.5, 64.0)  # Cobbe et al. (2020), Table 1
    assert hard["coinrun"] == table["coinrun"] == (5.0, 10.0)
    assert {game: hard[game] for game in hard if game not in PROCGEN} == {
        game: table[game] for game in table if game not in PROCGEN
    }  # Atari's scores do not depend on the mode


def test_procgen_ranges_match_the_procgen_script():
    """procgen_norm.csv and rainbow_procgen_gap.py's PROCGEN_SCORE_RANGES (its summary's normalized_score) are two
    copies of Cobbe et al.'s table: they must agree, game by game and mode by mode."""
    ranges = load_script("rainbow_procgen_gap").PROCGEN_SCORE_RANGES
    easy, hard = metrics.reference_table("easy"), metrics.reference_table("hard")
    assert sorted(ranges) == sorted(PROCGEN)
    for game, (easy_min, easy_max, hard_min, hard_max) in ranges.items():
        assert easy[game] == (easy_min, easy_max) and hard[game] == (hard_min, hard_max), game


def write_run(folder, script, env_id, seed, score, **args):
    folder.mkdir(parents=True)
    summary = dict(
        script=script,
        env_id=env_id,
        seed=seed,
        final_return=score,
        args=dict(seed=seed, env_id=env_id, output_dir="runs", **args),
    )
    (folder / "summary.json").write_text(json.dumps(summary))


def test_run_folders_to_aggregate_csv(tmp_path):
    table = metrics.reference_table()
    expected = {}
    for pooling, level in [("gap", 0.9), ("flatten", 0.4)]:
        normalised = []
        for game in ["Pong", "Breakout"]:
            random_score, human_score = table[game.lower()]
            for seed in range(3):
                fraction = level + 0.1 * seed
                write_run(
                    tmp_path / "runs" / f"{game}_{pooling}_{seed}",
                    "rainbow_impala_gap.py",
                    f"{game}-v5",
                    seed,
                    random_score + fraction * (human_score - random_score),
                    pooling=pooling,
                    scale=4,
                )
                normalised.append(fraction)
        label = "rainbow_impala_gap scale=4" if pooling == "gap" else "rainbow_impala_gap pooling=flatten scale=4"
        expected[label] = np.mean(normalised)  # gap is the script's default, so its label leaves it out
    (tmp_path / "runs" / "unfinished").mkdir()  # no summary.json: reported and skipped
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "benchmark/aggregate.py",
            *sorted(map(str, (tmp_path / "runs").iterdir())),
            "--out",
            str(out),
            "--reps",
            "200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stderr and "unfinished" in result.stderr
    rows = list(csv.DictReader(open(out / "aggregate.csv")))
    assert list(rows[0]) == ["method", "metric", "value", "ci_low", "ci_high"]
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in expected for k in metrics.METRICS}
    for row in rows:
        assert float(row["ci_low"]) <= float(row["value"]) + 1e-12 <= float(row["ci_high"]) + 2e-12
        if row["metric"] == "mean":
            assert float(row["value"]) == pytest.approx(expected[row["method"]])
    grouped = aggregate.main(
        aggregate.Args(
            run_dirs=[str(p) for p in (tmp_path / "runs").iterdir()],
            out=str(tmp_path / "grouped"),
            group_by=["pooling"],
            reps=50,
        )
    )
    assert {r["method"] for r in grouped} == {"rainbow_impala_gap pooling=gap", "rainbow_impala_gap pooling=flatten"}


def test_a_sweep_folder_is_searched_for_its_runs(tmp_path, capsys):
    """`aggregate.py runs/sweep` as a user types it: the runs below (sweep layout: point folder, then the script's run
    folder), finished ones aggregated, an interrupted one (a checkpoint, no summary) reported and skipped."""
    table = metrics.reference_table()
    random_score, human_score = table["pong"]
    for seed in range(2):
        point = tmp_path / "sweep" / f"Pong-v5__pooling=gap__seed{seed}"
        write_run(
            point / f"Pong-v5__rainbow_impala_gap__{seed}__1700000000",
            "rainbow_impala_gap.py",
            "Pong-v5",
            seed,
            random_score + 0.25 * (seed + 1) * (human_score - random_score),
        )
        (point / "log.txt").write_text("")
    interrupted = tmp_path / "sweep" / "Pong-v5__pooling=gap__seed9" / "Pong-v5__rainbow_impala_gap__9__1700000000"
    interrupted.mkdir(parents=True)
    (interrupted / "checkpoint.pt").write_bytes(b"")
    assert metrics.find_run_dirs([str(tmp_path / "sweep")]) == sorted(
        str(p) for p in (tmp_path / "sweep").glob("*/Pong-v5__*")
    )
    rows = aggregate.main(aggregate.Args(run_dirs=[str(tmp_path / "sweep")], out=str(tmp_path / "out"), reps=20, plots=False))
    mean = [r for r in rows if r["metric"] == "mean"]
    assert len(mean) == 1 and mean[0]["value"] == pytest.approx((0.25 + 0.5) / 2) and mean[0]["runs"] == 2
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no run folders"):
        metrics.find_run_dirs([str(tmp_path / "out")])


def test_matches_rliable_on_the_same_data():
    """Point estimates equal rliable's; interval ends agree within 0.01 (rliable's own runs differ by 0.002)."""
    reference = json.load(open(os.path.join(os.path.dirname(__file__), "data", "rliable_reference.json")))
    assert reference["metrics"] == metrics.METRICS
    for method in reference["methods"].values():
        scores = np.array(method["scores"])
        for i, metric in enumerate(metrics.METRICS):
            function = metrics.METRIC_FUNCTIONS[metric]
            assert function(scores) == pytest.approx(method["value"][i], abs=1e-12)
            low, high = metrics.stratified_bootstrap(scores, function, reps=20000, seed=0)
            assert low == pytest.approx(method["ci_low"][i], abs=0.01)
            assert high == pytest.approx(method["ci_high"][i], abs=0.01)


def test_scripts_that_evaluate_every_iteration_are_scored_on_their_final_evaluation(tmp_path):
    """DER (Atari 100k) and Procgen report evaluations; the ALE runs their last iteration's training return."""
    evaluations = [dict(step=10, mean_return=-20.7, episodes=100), dict(step=20, mean_return=-3.05, episodes=100)]
    summaries = {
        "der": dict(
            script="der_atari100k_gap.py", env_id="Pong", final_return=14.6, eval_return=-3.05, eval_by_iteration=evaluations
        ),
        "procgen": dict(
            script="rainbow_procgen_gap.py",
            env_id="bigfish",
            final_return=40.0,
            eval_return=20.5,
            eval_by_iteration=evaluations[:1],
        ),
        "ale": dict(script="rainbow_impala_gap.py", env_id="Pong-v5", final_return=-3.05, eval_return=14.6),
    }
    for name, summary in summaries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(dict(summary, seed=1, args=dict(seed=1))))
    runs = {os.path.basename(run.folder): run for run in metrics.load_runs(sorted(map(str, tmp_path.iterdir())), [])}
    assert {name: run.score for name, run in runs.items()} == pytest.approx(dict(der=0.5, procgen=0.5, ale=0.5))
    assert [point[1] for point in runs["der"].curve] == pytest.approx([0.0, 0.5])  # the curve of evaluations


def test_procgen_runs_are_normalised_with_the_ranges_of_their_distribution_mode(tmp_path):
    """A hard-mode run is normalised with the hard range, an easy-mode run with the easy one, read from each run's
    args; a mode without ranges stops with one clear line."""
    evaluations = [dict(step=100, mean_return=1.5, episodes=4), dict(step=200, mean_return=18.25, episodes=4)]
    for mode in ["hard", "easy"]:
        summary = dict(
            script="rainbow_procgen_gap.py",
            env_id="starpilot",
            seed=1,
            env_steps=200,
            frames=200,
            final_return=40.0,
            eval_return=18.25,
            eval_by_iteration=evaluations,
            args=dict(seed=1, env_id="starpilot", distribution_mode=mode),
        )
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "summary.json").write_text(json.dumps(summary))
    runs = {os.path.basename(run.folder): run for run in metrics.load_runs(sorted(map(str, tmp_path.iterdir())), [])}
    # starpilot: hard range [1.5, 35], easy range [2.5, 64] (Cobbe et al. 2020)
    assert runs["hard"].score == pytest.approx((18.25 - 1.5) / (35 - 1.5)) == pytest.approx(0.5)
    assert [point[0] for point in runs["hard"].curve] == [100, 200]  # Procgen: a frame is an agent step
    assert [point[1] for point in runs["hard"].curve] == pytest.approx([0.0, 0.5])
    assert runs["easy"].score == pytest.approx((18.25 - 2.5) / (64 - 2.5))
    assert [point[1] for point in runs["easy"].curve] == pytest.approx([(1.5 - 2.5) / 61.5, (18.25 - 2.5) / 61.5])
    assert runs["hard"].method == "rainbow_procgen_gap distribution_mode=hard"  # hard runs never mix with easy ones
    assert runs["easy"].method == "rainbow_procgen_gap"
    memory = json.loads((tmp_path / "hard" / "summary.json").read_text())
    memory["args"]["distribution_mode"] = "memory"
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "summary.json").write_text(json.dumps(memory))
    with pytest.raises(SystemExit, match="'memory' distribution mode, which has no ranges"):
        metrics.load_runs([str(tmp_path / "memory")], [])


def test_iteration_scores_each_run_at_that_iteration(tmp_path, capsys):
    """--iteration K: iteration K's return (or evaluation) is the score and the curve stops there; a run that has no
    return at K is reported and skipped."""

    def points(returns):
        return [dict(step=10 * (k + 1), mean_return=r, episodes=0 if r is None else 3) for k, r in enumerate(returns)]

    summaries = {
        "ale": dict(
            script="rainbow_impala_gap.py",
            env_id="Pong-v5",
            returns_by_iteration=points([-20.7, -3.05, 14.6]),
            final_return=14.6,
        ),
        "der": dict(
            script="der_atari100k_gap.py",
            env_id="Pong",
            eval_by_iteration=points([-3.05, 14.6]),
            eval_return=14.6,
            final_return=-20.7,
        ),
        "short": dict(
            script="rainbow_impala_gap.py", env_id="Pong-v5", returns_by_iteration=points([14.6]), final_return=14.6
        ),
        "no_episode": dict(
            script="rainbow_impala_gap.py",
            env_id="Pong-v5",
            returns_by_iteration=points([-20.7, None, 14.6]),
            final_return=14.6,
        ),
    }
    for name, summary in summaries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(dict(summary, seed=1, args=dict(seed=1))))
    folders = sorted(map(str, tmp_path.iterdir()))
    capsys.readouterr()
    at_two = {os.path.basename(run.folder): run for run in metrics.load_runs(folders, [], iteration=2)}
    skipped = capsys.readouterr().err
    assert {name: run.score for name, run in at_two.items()} == pytest.approx(dict(ale=0.5, der=1.0))
    assert "short: no return at iteration 2" in skipped and "no_episode: no return at iteration 2" in skipped
    assert [point[1] for point in at_two["ale"].curve] == pytest.approx([0.0, 0.5])
    at_one = {os.path.basename(run.folder): run.score for run in metrics.load_runs(folders, [], iteration=1)}
    assert at_one == pytest.approx(dict(ale=0.0, der=0.5, short=1.0, no_episode=0.0))
    final = {os.path.basename(run.folder): run.score for run in metrics.load_runs(folders, [])}
    assert final == pytest.approx(dict(ale=1.0, der=1.0, short=1.0, no_episode=1.0))
    with pytest.raises(SystemExit, match="--iteration counts from 1"):
        aggregate.main(aggregate.Args(run_dirs=folders, out=str(tmp_path / "out"), iteration=0))


def test_per_game_table_puts_the_reference_scores_beside_ours(tmp_path):
    """aggregate.md's per-game table: mean raw and normalised score over a game's runs, the table's random and human
    scores, the published score and our random play, each for that game; per_game.csv holds the same numbers."""
    # Breakout: random 1.7, human 30.5 (atari_human_random.csv); Pong: random -20.7, human 14.6
    for seed, score in [(1, 16.1), (2, 30.5)]:
        write_run(tmp_path / "runs" / f"breakout_{seed}", "der_atari100k_gap.py", "Breakout", seed, score)
        write_run(tmp_path / "runs" / f"pong_{seed}", "der_atari100k_gap.py", "Pong", seed, -3.05)  # as many runs a game
    published = tmp_path / "published.csv"
    published.write_text("game,der_score,hns\nBreakout,1.9,0.0069\n")  # no Pong: a dash
    random_play = tmp_path / "random_play.json"
    random_play.write_text(json.dumps({"Pong": {"mean_return": -20.2, "episodes": 30}}))  # no Breakout: a dash
    out = tmp_path / "out"
    aggregate.main(
        aggregate.Args(
            run_dirs=[str(tmp_path / "runs")],
            out=str(out),
            reps=10,
            plots=False,
            published=str(published),
            random_play=str(random_play),
        )
    )
    lines = (out / "aggregate.md").read_text().splitlines()
    start = lines.index("| method | game | runs | score | normalised | random | human | der_score | random play (ours) |")
    assert lines[start + 2 :] == [
        "| der_atari100k_gap | breakout | 2 | 23.3 | 0.750 | 1.7 | 30.5 | 1.9 | - |",  # (16.1 + 30.5) / 2; (0.5 + 1) / 2
        "| der_atari100k_gap | pong | 2 | -3.0 | 0.500 | -20.7 | 14.6 | - | -20.2 |",
    ]
    rows = list(csv.DictReader(open(out / "per_game.csv")))
    assert [(r["game"], r["runs"]) for r in rows] == [("breakout", "2"), ("pong", "2")]
    assert [float(r["score"]) for r in rows] == pytest.approx([23.3, -3.05])
    assert [float(r["normalised"]) for r in rows] == pytest.approx([0.75, 0.5])


def test_published_aggregate_is_computed_on_our_games(tmp_path):
    """Beside our metrics, aggregate.md gives the published scores' metrics on the games our method played, normalised
    with the same table: here Breakout (1.9 - 1.7) / (30.5 - 1.7) = 1/144 and Pong (-3.05 + 20.7) / (14.6 + 20.7) = 0.5;
    Alien's published score is left out, as no run of ours played it."""
    write_run(tmp_path / "runs" / "breakout", "der_atari100k_gap.py", "Breakout", 1, 16.1)
    write_run(tmp_path / "runs" / "pong", "der_atari100k_gap.py", "Pong", 1, -3.05)
    published = tmp_path / "published.csv"
    published.write_text("game,der_score,hns\nAlien,739.9,0.0742\nBreakout,1.9,0.0069\nPong,-3.05,0.5\n")
    out = tmp_path / "out"
    aggregate.main(
        aggregate.Args(run_dirs=[str(tmp_path / "runs")], out=str(out), reps=10, plots=False, published=str(published))
    )
    lines = (out / "aggregate.md").read_text().splitlines()
    label = "der_score (published) on the games of der_atari100k_gap"
    mean = (1 / 144 + 0.5) / 2  # two games: the IQM trims nothing, and the median of two is their mean
    expected = dict(iqm=mean, median=mean, mean=mean, optimality_gap=1 - mean)
    published_rows = [line.split(" | ") for line in lines if line.startswith(f"| {label} |")]
    assert [row[1] for row in published_rows] == ["iqm", "median", "mean", "optimality_gap"]
    for row in published_rows:
        assert float(row[2]) == pytest.approx(expected[row[1]], abs=5e-4)
        assert row[3:] == ["-", "1 x 2 |"]


def test_published_aggregate_needs_every_game():
    """A game without a published score: no aggregate (it would compare different sets of games)."""
    assert metrics.published_aggregate({"pong": 0.0}, ["breakout", "pong"]) is None
