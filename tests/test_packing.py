"""benchmark/packing.py: it reads the scripts' own progress lines, opens its window only when every run is warm, and
counts each run's steps in it exactly (runs are timed on a device, never here: tests don't time)."""

import contextlib
import io
from types import SimpleNamespace

import pytest
import tyro

from benchmark.packing import Args, main, measurement_window, read_progress_line, run_command, steps_per_second
from benchmark.scripts import ALL_SCRIPTS, load_script


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_reads_each_scripts_progress_line(name):
    module = load_script(name)
    loop = SimpleNamespace(global_step=1_234_567, updates=308_641, last_return=None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        module.print_progress(module.Args(), loop, 512.3, 0.01)
    assert read_progress_line(printed.getvalue()) == (1_234_567, 308_641)
    assert read_progress_line("network: impala phi -> 11x11x32 -> gap") is None


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_runs_without_pauses_and_report_each_second(name, tmp_path):
    """Every script takes the flags packing.py adds: no evaluation and no checkpoint (they pause training), a
    progress line a second."""
    arg_set = "scale=4" if name == "rainbow_softmoe1" else "pooling=gap scale=4"  # SoftMoE-1 has no --pooling
    command = run_command(Args(script=name, env_id="Pong-v5"), arg_set, seed=3, output_dir=str(tmp_path))
    module = load_script(name)
    script_args = tyro.cli(module.Args, args=command[2:])
    assert (script_args.eval_episodes, script_args.checkpoint_every, script_args.progress_seconds) == (0, 0, 1.0)
    assert (script_args.seed, script_args.output_dir) == (3, str(tmp_path))
    assert script_args.scale == 4 and getattr(script_args, "pooling", "gap") == "gap"


def linear_progress(first_seen: float, last_seen: float, steps_per_second: float, learning_from: int):
    """Progress lines every second of a run making `steps_per_second`, one update a step after learning_from."""
    progress = []
    for second in range(int(first_seen), int(last_seen) + 1):
        step = round(steps_per_second * (second - first_seen))
        progress.append((float(second), step, max(0, step - learning_from)))
    return progress


def test_window_opens_when_every_run_is_warm_and_counts_exact_rates():
    fast = linear_progress(0, 40, steps_per_second=100, learning_from=200)  # 100 updates by second 3
    slow = linear_progress(5, 40, steps_per_second=40, learning_from=200)  # 100 updates by second 12.5 -> 13
    window = measurement_window([fast, slow], warmup_updates=100, seconds=20.0)
    assert window == (14.0, 34.0)  # a second after the slower run's first line with 100 updates
    assert steps_per_second(fast, window) == pytest.approx(100.0)
    assert steps_per_second(slow, window) == pytest.approx(40.0)


def test_window_waits_for_every_run():
    fast = linear_progress(0, 40, steps_per_second=100, learning_from=200)
    still_filling = linear_progress(0, 40, steps_per_second=5, learning_from=200)  # never 100 updates
    assert measurement_window([fast, still_filling], warmup_updates=100, seconds=20.0) is None
    not_yet_past_the_end = linear_progress(0, 20, steps_per_second=100, learning_from=200)  # warm at 3, end 24
    assert measurement_window([fast, not_yet_past_the_end], warmup_updates=100, seconds=20.0) is None
    assert measurement_window([fast, []], warmup_updates=100, seconds=20.0) is None  # no line yet


def test_steps_between_lines_are_interpolated():
    progress = [(0.0, 0, 0), (2.0, 100, 100), (4.0, 500, 500)]  # 50 steps/s, then 200
    assert steps_per_second(progress, (1.0, 3.0)) == pytest.approx((300 - 50) / 2)


def test_two_runs_on_catch_make_a_row(tmp_path):
    """The whole measurement through real runs of the flagship on the pixel Catch env (its figures are not asserted)."""
    arg_set = "env-backend=gymnasium learning-starts=50 buffer-size=1000 scale=1 iteration-steps=100000"
    args = Args(
        env_id="toy_envs.catch:Catch-v0",
        arg_sets=[arg_set],
        counts=[2],
        gpu="",
        warmup_updates=5,
        measure_seconds=2.0,
        timeout_seconds=300.0,
        out=str(tmp_path),
    )
    rows = main(args)
    assert len(rows) == 1 and rows[0]["runs"] == 2 and rows[0]["vs_one"] == "-"  # no one-run row to compare with
    assert 0 < rows[0]["slowest_sps"] <= rows[0]["per_run_sps"] <= rows[0]["fastest_sps"]
    assert rows[0]["aggregate_sps"] == pytest.approx(2 * rows[0]["per_run_sps"], abs=0.16)  # both rounded to 0.1
    assert (tmp_path / "packing.md").read_text().count("\n") == 3  # header, rule, the row
    logs = sorted(path.name for path in tmp_path.glob("logs/*/*.txt"))
    assert logs == ["seed1.txt", "seed2.txt"]
