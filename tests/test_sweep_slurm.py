"""benchmark/sweep.py --backend slurm on a real one-node Slurm cluster started for these tests (tests/slurm_cluster.py):
an array job runs the grid, failures are reported with their logs, finished runs are not submitted again, and a task
told to stop checkpoints and resumes when requeued: by itself after a SIGUSR1 (as before its time limit), by Slurm
after `scontrol requeue` (as a preemption)."""

import glob
import json
import os
import re
import time

import pytest

from benchmark import sweep
from tests.helpers import CATCH_RUN, LONG_RUN, run_sweep
from tests.slurm_cluster import SlurmCluster, SlurmError, as_root, install

CATCH_GAME = ["--games", "toy_envs.catch:Catch-v0"]
SLURM_FLAGS = ["--backend", "slurm", "--partition", "debug", "--cpus-per-task", "1", "--mem", "200M", "--time-limit", "10:00"]


# Opt-in: these tests install Slurm and munge with apt-get where missing and start daemons, which a plain
# `python -m pytest` must not do. .ci/run sets the variable and runs them in one process of their own (one cluster
# serves them all; under pytest-xdist each worker would start its own).
OPT_IN = "CLEANRL_GAP_SLURM_TESTS"


@pytest.fixture(scope="session")
def slurm():
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"real-Slurm tests install packages and start daemons: set {OPT_IN}=1 to run them")
    root = as_root()
    if root is None:
        pytest.skip("a Slurm cluster needs root or passwordless sudo")
    cluster = None
    try:
        install(root)
        cluster = SlurmCluster(root)
        cluster.start()
    except SlurmError as error:
        if cluster:
            cluster.stop()
        pytest.fail(f"could not start a Slurm cluster: {error}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm.conf)  # for sweep.py's sbatch, and the jobs inherit it
    return slurm


def submitted_job(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"submitted array job (\d+)", result.stdout).group(1)


def wait_for_job(slurm: SlurmCluster, job_id: str, timeout: float = 600) -> None:
    # a generous limit: it returns as soon as the job leaves the queue, and a slow, busy machine needs minutes
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not slurm.run("squeue", "--noheader", "--jobs", job_id, check=False).stdout.strip():
            return
        time.sleep(1)
    queue = slurm.run("squeue", "--jobs", job_id, "--format=%i %T %r", check=False).stdout
    pytest.fail(f"job {job_id} still queued after {timeout} s:\n{queue}{slurm.logs()}")


def test_slurm_sweep_runs_the_grid_reports_failures_and_skips_finished_runs(slurm_env, tmp_path):
    flags = [
        *CATCH_GAME,
        "--seeds",
        "1",
        "2",
        "--arg-sets",
        f"{CATCH_RUN} scale=1",
        f"{CATCH_RUN} scale=0",
        "--out",
        str(tmp_path),
    ]
    job_id = submitted_job(run_sweep(*flags, *SLURM_FLAGS))
    script = open(tmp_path / "slurm" / "submission-1.sh").read()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --requeue" in script and "#SBATCH --mem=200M" in script
    wait_for_job(slurm_env, job_id)

    summaries = glob.glob(str(tmp_path / "*" / "*" / "summary.json"))
    assert len(summaries) == 2 and {json.load(open(s))["seed"] for s in summaries} == {1, 2}
    assert all(json.load(open(s))["env_steps"] == 150 and "scale=1" in s for s in summaries)
    task_logs = "".join(open(log).read() for log in glob.glob(str(tmp_path / "slurm" / f"{job_id}_*.out")))
    assert task_logs.count("finished") == 2, task_logs
    failures = re.findall(r"failed: exit code 2, log (\S+)", task_logs)
    assert len(failures) == 2 and all("scale=0" in log and os.path.exists(log) for log in failures), task_logs

    status = run_sweep(*flags, "--status")
    assert status.returncode == 1 and "2 of 4 runs finished" in status.stdout
    assert status.stdout.count("failed: exit code 2, log ") == 2

    again = run_sweep(*flags, *SLURM_FLAGS)  # only the failed runs go again
    assert "2 runs to do" in again.stdout
    wait_for_job(slurm_env, submitted_job(again))
    assert "#SBATCH --array=0-1" in open(tmp_path / "slurm" / "submission-2.sh").read()


@pytest.mark.parametrize(
    "stop, signal_name, requeued_by_task",
    [
        (["scancel", "--signal=USR1", "--batch"], "SIGUSR1", True),  # what Slurm sends before the time limit
        (["scontrol", "requeue"], "SIGTERM", False),  # as a preemption: SIGTERM to every process, Slurm requeues
    ],
    ids=["usr1-before-time-limit", "scontrol-requeue"],
)
def test_a_stopped_task_checkpoints_is_requeued_and_resumes(slurm_env, tmp_path, stop, signal_name, requeued_by_task):
    job_id = submitted_job(
        run_sweep(*CATCH_GAME, "--seeds", "1", "--arg-sets", LONG_RUN, "--out", str(tmp_path), *SLURM_FLAGS)
    )
    folder = sweep.run_folder(str(tmp_path), ("toy_envs.catch:Catch-v0", LONG_RUN, 1))
    log = os.path.join(folder, "log.txt")
    deadline = time.time() + 60
    while not (os.path.exists(log) and "step " in open(log).read()) and time.time() < deadline:
        time.sleep(0.2)  # its training loop runs: the signal handlers are in place
    assert "step 30,000/" not in open(log).read(), "the run finished before it could be stopped"
    slurm_env.run(*stop, f"{job_id}_0")
    wait_for_job(slurm_env, job_id)

    run_log = open(log).read()
    assert f"{signal_name}: checkpointed step" in run_log and "resuming" in run_log, run_log
    (summary,) = glob.glob(os.path.join(folder, "*", "summary.json"))
    assert json.load(open(summary))["env_steps"] == 30000
    task_log = open(tmp_path / "slurm" / f"{job_id}_0.out").read()
    assert "exit code 75" in task_log and "(restart 1): resuming" in task_log and "finished" in task_log, task_log
    assert (f"task {job_id}_0: requeued" in task_log) == requeued_by_task, task_log
