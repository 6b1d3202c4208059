"""benchmark/sweep.py on this machine: the grid, failures reported with their logs, finished runs skipped,
interrupted runs resumed, Ctrl-C turned into checkpoints."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import tyro

from benchmark import sweep
from benchmark.scripts import ROOT
from tests.helpers import CATCH_RUN, LONG_RUN, run_sweep


def test_dry_run_prints_the_whole_grid(tmp_path):
    result = run_sweep(
        "--games",
        "paper20",
        "--seeds",
        "1",
        "2",
        "--arg-sets",
        "pooling=flatten",
        "pooling=gap",
        "--out",
        str(tmp_path),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "rainbow_impala_gap.py" in line]
    assert len(commands) == 20 * 2 * 2
    assert sum("--env-id Pong-v5 --seed 2 --pooling gap" in c for c in commands) == 1
    assert not os.listdir(tmp_path)  # nothing ran


def test_local_sweep_reports_failures_skips_finished_runs_and_resumes(tmp_path):
    flags = [
        "--games",
        "toy_envs.catch:Catch-v0",
        "--seeds",
        "1",
        "2",
        "--arg-sets",
        f"{CATCH_RUN} scale=1",
        f"{CATCH_RUN} scale=0",
        "--workers",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = run_sweep(*flags)
    assert result.returncode == 1
    assert "2 of 4 runs finished" in result.stdout
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed: exit code 2, log ")]
    assert len(failures) == 2 and all("scale=0" in line and os.path.exists(line.split("log ")[1]) for line in failures)
    summaries = glob.glob(str(tmp_path / "*" / "*" / "summary.json"))
    assert len(summaries) == 2 and {json.load(open(s))["seed"] for s in summaries} == {1, 2}

    again = run_sweep(*flags, "--dry-run")
    assert (
        "2 runs to do" in again.stdout and "--scale 1 " not in again.stdout and "--scale 0" in again.stdout
    )  # finished runs are skipped

    os.remove(summaries[0])  # as if killed after its last checkpoint
    args = sweep.Args(games=["toy_envs.catch:Catch-v0"], seeds=[1, 2], arg_sets=[f"{CATCH_RUN} scale=1"], out=str(tmp_path))
    (resumed,) = sweep.plan(args)
    assert resumed.resume and resumed.command[-2] == "--resume"
    assert sweep.main(args) == 0 and os.path.exists(summaries[0])


def test_slurm_dry_run_script_checkpoints_before_the_time_limit_and_requeues(tmp_path):
    """No cluster needed: --dry-run prints the sbatch script. A task is told SIGUSR1 --signal-seconds before its time
    limit (B: to the batch shell, which execs the task's python, which forwards it to the run), and may be requeued."""
    result = run_sweep(
        "--games",
        "Pong",
        "Breakout",
        "--seeds",
        "1",
        "--backend",
        "slurm",
        "--time-limit",
        "1:00:00",
        "--signal-seconds",
        "240",
        "--out",
        str(tmp_path),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "#SBATCH --signal=B:USR1@240" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --time=1:00:00" in lines and "#SBATCH --array=0-1" in lines
    (exec_line,) = [line for line in lines if line.startswith("exec ")]  # exec: the signal reaches python itself
    assert "benchmark/sweep.py --slurm-task" in exec_line
    assert not os.listdir(tmp_path)  # nothing written, nothing submitted


def test_runs_at_once_share_the_cores_unless_the_user_set_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert sweep.threads_per_run(1) == {}  # one run: torch's default, every core
    assert sweep.threads_per_run(2) == {"OMP_NUM_THREADS": "4"}
    assert sweep.threads_per_run(3) == {"OMP_NUM_THREADS": "2"}
    assert sweep.threads_per_run(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sweep.threads_per_run(2) == {}  # the user's choice is inherited as it is


def test_each_gpu_goes_to_at_most_runs_per_gpu_runs_at_once():
    slots = sweep.GpuSlots(["0", "1"], per_gpu=2)
    held = contextlib.ExitStack()
    taken = [held.enter_context(slots.slot()) for _ in range(4)]
    assert sorted(taken) == ["0", "0", "1", "1"]
    assert slots.free.empty()  # a fifth run waits for one of these to end
    held.close()
    assert sorted(slots.free.queue) == ["0", "0", "1", "1"]
    with sweep.GpuSlots([], per_gpu=2).slot() as gpu:
        assert gpu == ""  # no --gpus: the default device, for any number of runs


def test_runs_at_once_default_to_the_packing_that_paid_on_a_gpu(monkeypatch):
    def args(*flags):
        return tyro.cli(sweep.Args, args=list(flags))

    monkeypatch.setattr(sweep, "mps_running", lambda: False)
    assert sweep.runs_at_once(args()) == (4, 1)  # no --gpus: one run at a time unless --workers says otherwise
    assert sweep.runs_at_once(args("--gpus", "0", "1")) == (4, 8)
    assert sweep.runs_at_once(args("--gpus", "0", "--runs-per-gpu", "2")) == (2, 2)
    assert sweep.runs_at_once(args("--gpus", "0", "1", "--workers", "3")) == (4, 3)
    monkeypatch.setattr(sweep, "mps_running", lambda: True)
    assert sweep.runs_at_once(args("--gpus", "0")) == (8, 8)


def test_mps_is_seen_through_its_control_pipe(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not sweep.mps_running()
    (tmp_path / "control").touch()
    assert sweep.mps_running()


def test_a_local_sweep_never_puts_more_runs_on_a_gpu_than_asked(monkeypatch, tmp_path):
    """Eight runs, four workers, two GPUs, one run per GPU: each run records the GPU it got while it runs."""
    running = {"0": 0, "1": 0}
    most = {"0": 0, "1": 0}
    lock = threading.Lock()

    def fake_launch(run, gpu, started, extra_env, own_process_group):
        with lock:
            running[gpu] += 1
            most[gpu] = max(most[gpu], running[gpu])
        time.sleep(0.05)
        with lock:
            running[gpu] -= 1
        return 0

    monkeypatch.setattr(sweep, "launch", fake_launch)
    flags = ["--games", "Pong", "Breakout", "--seeds", "1", "2", "3", "4", "--gpus", "0", "1", "--runs-per-gpu", "1"]
    assert sweep.main(tyro.cli(sweep.Args, args=[*flags, "--workers", "4", "--out", str(tmp_path)])) == 0
    assert most == {"0": 1, "1": 1}


def test_launch_hands_the_run_its_threads_and_its_gpu(tmp_path):
    show_env = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['CUDA_VISIBLE_DEVICES'])"
    run = sweep.Run(folder=str(tmp_path), command=[sys.executable, "-c", show_env], resume=False, point=("", "", 1))
    assert sweep.launch(run, "3", extra_env={"OMP_NUM_THREADS": "4"}) == 0
    assert open(tmp_path / "log.txt").read() == "4 3\n"
    assert open(tmp_path / sweep.EXIT_CODE_FILE).read() == "0\n"


def test_ctrl_c_stops_a_local_sweep_and_its_running_run_checkpoints(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to its foreground process group: here the sweep's own group, which the runs
    are not in. The sweep passes it on as SIGTERM, so its running run checkpoints and exits with 75; the next run is
    not started; the sweep exits with 75, and the same command would resume the first run and start the second."""
    game = "toy_envs.catch:Catch-v0"
    flags = ["--games", game, "--seeds", "1", "2", "--arg-sets", LONG_RUN, "--workers", "1", "--out", str(tmp_path)]
    sweep_process = subprocess.Popen(
        [sys.executable, "benchmark/sweep.py", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    first, second = [sweep.run_folder(str(tmp_path), (game, LONG_RUN, seed)) for seed in (1, 2)]
    log = os.path.join(first, "log.txt")
    deadline = time.time() + 120
    while not (os.path.exists(log) and "step " in open(log).read()) and time.time() < deadline:
        time.sleep(0.1)  # its training loop runs: its signal handlers are in place
    assert "step 30,000/" not in open(log).read(), "the run finished before it could be stopped"
    os.killpg(sweep_process.pid, signal.SIGINT)
    out, err = sweep_process.communicate(timeout=120)

    assert sweep_process.returncode == sweep.PREEMPTED, out + err
    assert "SIGTERM: checkpointed step" in open(log).read()
    assert "0 of 2 runs finished" in out and "1 runs not started" in out, out
    assert "preempted; re-run the sweep to resume it: exit code 75" in err, err
    assert not os.path.exists(second)
    resumed, new = sweep.plan(sweep.Args(games=[game], seeds=[1, 2], arg_sets=[LONG_RUN], out=str(tmp_path)))
    assert resumed.folder == first and resumed.resume
    assert new.folder == second and not new.resume
