"""Runs survive being stopped: checkpoints restore exactly, SIGKILL at any time loses at most the steps since the last
checkpoint, SIGTERM/SIGUSR1 checkpoint and exit with PREEMPTED, divergence stops cleanly, bad checkpoints are refused."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmark.scripts import ALL_SCRIPTS, ROOT, load_script, script_path, training_parts
from tests.helpers import CATCH, run_script

RUN = [
    *CATCH,
    "--learning-starts",
    "100",
    "--log-every",
    "50",
    "--iteration-steps",
    "200",
    "--progress-seconds",
    "1e9",
    "--no-cuda",
    "--train-frequency",
    "4",
    "--eval-episodes",
    "2",
]


def start(name, args, output_dir):
    return subprocess.Popen(
        [sys.executable, script_path(name), "--output-dir", str(output_dir), *RUN, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.001)


def run_folder(output_dir) -> str:
    (run_dir,) = glob.glob(os.path.join(str(output_dir), "*"))
    return run_dir


def assert_same(actual, expected, where="state"):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_checkpoint_restores_exactly_what_was_saved(name, tmp_path):
    module = load_script(name)
    args = module.Args(frame_size=24, buffer_size=600, batch_size=8, learning_rate=1e-3, cuda=False)
    device = torch.device("cpu")

    torch.manual_seed(0)
    parts = training_parts(module, args, device)
    replay = parts.replay
    replay.rewards.uniform_(-1, 1)
    replay.cursor, replay.adds = 123, 700
    for _ in range(3):
        parts.update()
    np.random.rand(7)  # move every RNG away from its seed
    torch.rand(3)
    loop = module.LoopState(
        global_step=1234,
        updates=3,
        iteration_returns=[1.0, -1.0],
        last_return=-1.0,
        diagnostics_obs=torch.ones(2, 4, 24, 24, dtype=torch.uint8),
        wall_seconds=5.0,
        learning_from=100,
    )
    saved = module.training_state(parts, args, loop)
    run_dir = str(tmp_path)
    module.write_atomically(saved, os.path.join(run_dir, "checkpoint.pt"))
    expected_draws = (torch.rand(4), np.random.rand(4))

    torch.manual_seed(99)
    np.random.seed(99)
    fresh = training_parts(module, args, device)  # different weights and replay contents, all to be overwritten
    state = module.read_checkpoint(run_dir, args)
    module.restore_training_state(state, fresh)
    assert_same(module.training_state(fresh, args, module.LoopState(**state["loop"])), saved)
    assert torch.equal(fresh.replay.frames, replay.frames) and torch.equal(fresh.replay.priorities, replay.priorities)
    assert fresh.optimizer.state_dict()["state"][0]["exp_avg_sq"].abs().sum() > 0  # Adam's moments came back, not zeros
    draws = (torch.rand(4), np.random.rand(4))  # the random streams go on exactly where they stood
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_sigkill_in_training_and_in_a_checkpoint_write_then_resume(name, tmp_path):
    total, learning_starts = 1500, 100
    # a 200k-transition replay makes each checkpoint write long enough (~120 MB) to be caught mid-write
    args = ["--total-timesteps", str(total), "--checkpoint-every", "200", "--buffer-size", "200000"]
    process = start(name, args, tmp_path)
    wait_for(lambda: glob.glob(str(tmp_path / "*" / "checkpoint.pt")), process)
    process.kill()  # in the middle of training: the first checkpoint is complete, the next not begun
    process.wait()
    run_dir = run_folder(tmp_path)
    checkpoint, partial = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "checkpoint.pt.tmp")
    first_step = torch.load(checkpoint, weights_only=False)["loop"]["global_step"]

    process = start(name, [*args, "--resume", run_dir], tmp_path)
    wait_for(lambda: os.path.exists(partial), process)
    process.kill()  # in the middle of a checkpoint write
    process.wait()
    assert os.path.exists(partial), "the kill should land while the temporary file is being written"
    step = torch.load(checkpoint, weights_only=False)["loop"]["global_step"]  # the previous one, complete
    assert step >= first_step and step % 200 == 0

    result = run_script(name, [*RUN, *args, "--resume", run_dir], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming {run_dir} at step {step:,}" in result.stdout
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["env_steps"] == total and summary["updates"] == (total - learning_starts) // 4
    assert [it["step"] for it in summary["returns_by_iteration"]] == list(range(200, total + 1, 200)) + [total]
    if "eval_by_iteration" in summary:  # scripts that evaluate after every iteration keep each evaluation
        assert [it["step"] for it in summary["eval_by_iteration"]] == list(range(200, total + 1, 200)) + [total]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_with_preempted(name, stop_signal, tmp_path):
    module = load_script(name)
    process = start(name, ["--total-timesteps", "100000", "--checkpoint-every", "0", "--buffer-size", "2000"], tmp_path)
    wait_for(lambda: glob.glob(str(tmp_path / "*" / "events.out.tfevents.*")), process)
    time.sleep(3)  # well into training
    process.send_signal(stop_signal)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == module.PREEMPTED == 75, stderr
    assert "Traceback" not in stderr and f"{stop_signal.name}: checkpointed step" in stdout
    run_dir = run_folder(tmp_path)
    step = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["loop"]["global_step"]
    assert 0 < step < 100000

    result = run_script(
        name,
        [*RUN, "--total-timesteps", str(step + 50), "--checkpoint-every", "0", "--buffer-size", "2000", "--resume", run_dir],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.load(open(os.path.join(run_dir, "summary.json")))["env_steps"] == step + 50


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(name, tmp_path):
    module = load_script(name)
    result = run_script(
        name,
        [
            *RUN,
            "--learning-rate",
            "1e30",
            "--total-timesteps",
            "2000",
            "--checkpoint-every",
            "100",
            "--buffer-size",
            "2000",
            "--log-every",
            "10",
        ],
        tmp_path,
    )
    assert result.returncode == module.DIVERGED == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the loss became "), result.stderr
    diverged_at = int(re.search(r"by step ([\d,]+)", lines[0]).group(1).replace(",", ""))
    state = torch.load(os.path.join(run_folder(tmp_path), "checkpoint.pt"), weights_only=False)
    assert 0 < state["loop"]["global_step"] < diverged_at < 2000
    assert all(torch.isfinite(value).all() for value in state["net"].values())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """name -> the folder of a short Catch run of that script, with its checkpoint (one run per script)."""
    runs = {}

    def run_of(name):
        if name not in runs:
            output_dir = tmp_path_factory.mktemp("finished")
            result = run_script(
                name, [*RUN, "--total-timesteps", "150", "--checkpoint-every", "150", "--buffer-size", "1000"], output_dir
            )
            assert result.returncode == 0, result.stderr
            runs[name] = run_folder(output_dir)
        return runs[name]

    return run_of


def corrupt(run_dir, how):
    path = os.path.join(run_dir, "checkpoint.pt")
    data = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "garbage":
        open(path, "wb").write(b"not a checkpoint" * 100)
    elif how == "missing":
        os.remove(path)
    elif how == "other script":
        state = torch.load(path, weights_only=False)
        state["script"] = "another_script.py"
        torch.save(state, path)


@pytest.mark.parametrize("name", ALL_SCRIPTS)
@pytest.mark.parametrize(
    "how,args,message",
    [
        ("truncated", [], "is corrupt or truncated"),
        ("garbage", [], "is corrupt or truncated"),
        ("missing", [], "no complete checkpoint"),
        ("other script", [], "was written by another_script.py"),
        (None, ["--scale", "2"], "--scale is 1 in the checkpoint, 2 here"),
        (None, ["--gamma", "0.9"], "--gamma is 0.99 in the checkpoint, 0.9 here"),
    ],
)
def test_bad_resume_fails_with_one_clear_line(name, how, args, message, finished_run, tmp_path):
    run_dir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", finished_run(name), run_dir], check=True)
    if how:
        corrupt(run_dir, how)
    result = run_script(
        name, [*RUN, "--total-timesteps", "300", "--buffer-size", "1000", *args, "--resume", run_dir], tmp_path
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume") and message in lines[0], result.stderr


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_resume_without_the_replay_refills_it_before_learning(name, tmp_path):
    args = [*RUN, "--buffer-size", "2000", "--no-checkpoint-replay"]
    first = run_script(name, [*args, "--total-timesteps", "300", "--checkpoint-every", "300"], tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = run_folder(tmp_path)
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert "frames" not in state["replay"] and state["replay"]["adds"] == 0  # the replay stayed out
    result = run_script(name, [*args, "--total-timesteps", "600", "--resume", run_dir], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refilling it for 100 steps before learning" in result.stdout
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    # learning paused for steps 301-400 while the replay refilled: updates at steps 101-300 and 401-600
    assert summary["env_steps"] == 600 and summary["updates"] == (300 - 100) // 4 + (600 - 400) // 4
