"""Run a grid of experiments on this machine or on a Slurm cluster: script x games x seeds x argument sets.

    python benchmark/sweep.py --script rainbow_impala_gap --games paper20 --seeds 1 2 3 4 5 \\
        --arg-sets "pooling=flatten scale=4" "pooling=gap scale=4" --gpus 0 1 --out runs/sweep
    python benchmark/sweep.py ... --dry-run        # print the commands only
    python benchmark/sweep.py ... --backend slurm --partition gpu --gpus-per-task 1 --time-limit 2-00:00:00
    python benchmark/sweep.py ... --status         # every run: finished, failed (exit code, log), interrupted

Each run gets its own folder OUT/{game}__{arg set}__seed{seed}/ (the script's run folder inside it, and log.txt).
A run whose folder already holds a summary.json is skipped; one with a checkpoint.pt (killed, preempted) goes on
with --resume; so a sweep is re-launched as it was after any failure. Runs go to a pool of --workers processes, and
GPUs are handed out through CUDA_VISIBLE_DEVICES, each to at most --runs-per-gpu runs at once (several runs on one
GPU get more done per GPU hour, most under CUDA MPS: docs/sweeps.md). A run that fails is reported with its log and
exit code, never dropped, and the sweep then exits non-zero. With several workers, each run gets an equal share of this
machine's cores (OMP_NUM_THREADS, unless it is already set): torch would give every run all of them. Named game
sets: paper20 (the 20 games of the paper, after Obando Ceron et al. 2024), atari60 (Dopamine's 60), atari100k (the
26 of Atari 100k), procgen (the 16 games). Every run's last exit code is kept in its folder (exit_code.txt), for
--status. To stop a local sweep without losing work, press Ctrl-C or send it SIGTERM: each running run is told
(SIGTERM) to checkpoint and exits with 75, runs not yet started are not started, and the sweep exits with 75;
the same command resumes them all. (The runs have their own process group, so a terminal's Ctrl-C reaches only
the sweep, which passes it on as SIGTERM: the scripts checkpoint on SIGTERM, not on SIGINT.)

Slurm (--backend slurm): the unfinished runs become ONE array job, a task a run. sweep.py writes
OUT/slurm/submission-K.sh (the sbatch script) and OUT/slurm/submission-K.runs.json (the grid points of its tasks, in
task order), submits it with sbatch and prints the job id; task logs go to OUT/slurm/JOBID_TASK.out, each run's own
output to its log.txt as with the local backend. A task does not run a command fixed at submission: the script
execs `sweep.py --slurm-task RUNS_FILE`, which plans its one run when the task starts (plan_run: summary.json ->
exit 0, checkpoint.pt -> --resume, else a new run), so a requeued task picks up where its run stopped. Stops:
  * time limit: --signal=B:USR1@SECONDS signals the batch shell, which is this python (exec); it forwards USR1 to
    the run, which checkpoints and exits with 75, and then the task requeues itself (scontrol requeue JOB_TASK).
    Only a USR1 leads to a requeue, so `scancel --signal=USR1 --batch JOB_TASK` checkpoints a run and requeues it.
  * preemption or `scontrol requeue` (--requeue): Slurm sends SIGTERM to every process of the task, the run
    checkpoints within KillWait and exits with 75, and Slurm requeues the task itself.
  * scancel: SIGTERM as above, the run checkpoints, nothing requeues it; re-submitting the sweep resumes it.
Re-submitting the same command submits only the runs not finished (don't while an earlier array is still queued:
a run would get two tasks at once). Failed tasks keep the array's other tasks going; --status lists them.
"""

import contextlib
import glob
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Optional, Tuple

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import ROOT, script_path  # noqa: E402

# the named sets --games accepts (each a list of games; `.split()` keeps the long lists readable)
GAME_SETS = {
    "paper20": (
        "Asterix SpaceInvaders Breakout Pong Qbert DemonAttack Seaquest WizardOfWor RoadRunner BeamRider Frostbite "
        "CrazyClimber Assault Krull Boxing Jamesbond Kangaroo UpNDown Gopher Hero"
    ).split(),
    "atari60": (
        "AirRaid Alien Amidar Assault Asterix Asteroids Atlantis BankHeist BattleZone BeamRider Berzerk Bowling Boxing "
        "Breakout Carnival Centipede ChopperCommand CrazyClimber DemonAttack DoubleDunk ElevatorAction Enduro "
        "FishingDerby Freeway Frostbite Gopher Gravitar Hero IceHockey Jamesbond JourneyEscape Kangaroo Krull "
        "KungFuMaster MontezumaRevenge MsPacman NameThisGame Phoenix Pitfall Pong Pooyan PrivateEye Qbert Riverraid "
        "RoadRunner Robotank Seaquest Skiing Solaris SpaceInvaders StarGunner Tennis TimePilot Tutankham UpNDown "
        "Venture VideoPinball WizardOfWor YarsRevenge Zaxxon"
    ).split(),
    "atari100k": (
        "Alien Amidar Assault Asterix BankHeist BattleZone Boxing Breakout ChopperCommand CrazyClimber DemonAttack "
        "Freeway Frostbite Gopher Hero Jamesbond Kangaroo Krull KungFuMaster MsPacman Pong PrivateEye Qbert RoadRunner "
        "Seaquest UpNDown"
    ).split(),
    "procgen": (
        "bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner ninja "
        "plunder starpilot"
    ).split(),
}


@dataclass
class Args:
    script: str = "rainbow_impala_gap"
    """the script of cleanrl_gap/ to run"""
    games: List[str] = field(default_factory=lambda: ["paper20"])
    """env ids or named sets (paper20, atari60, atari100k, procgen); Atari names become envpool ids (Pong-v5)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """seeds of every configuration"""
    arg_sets: List[str] = field(default_factory=lambda: [""])
    """argument sets, one configuration each: "name=value" pairs and bare flags, e.g. "pooling=gap scale=4 dueling"
    (the script gets --pooling gap --scale 4 --dueling)"""
    workers: Optional[int] = None
    """runs at once (none: --runs-per-gpu for each of --gpus, or 1 without --gpus)"""
    gpus: List[str] = field(default_factory=list)
    """GPU ids handed out through CUDA_VISIBLE_DEVICES, each to at most --runs-per-gpu runs at once (none: the default
    device)"""
    runs_per_gpu: Optional[int] = None
    """local, with --gpus: runs sharing each GPU at once (none: 8 while a CUDA MPS control daemon runs, else 4). On an
    H200, 8 runs of one env each made 4.0 to 4.3 times the agent steps of one run alone under MPS, and 1.1 to 1.6
    times without it, where 4 runs made as much as 8 (docs/speed.md#runs-per-gpu-nvidia-h200). Lower it where that
    many replays do not fit on a GPU (1M transitions take 7.07 GB)"""
    out: str = "runs/sweep"
    """the sweep's folder"""
    dry_run: bool = False
    """print the commands (and with --backend slurm the sbatch script) and do nothing"""
    status: bool = False
    """report every run of the grid (finished, failed with its exit code and log, interrupted, not started) and exit"""
    backend: Literal["local", "slurm"] = "local"
    """where the runs go: local (--workers processes on this machine) or slurm (one sbatch array job, a task a run)"""
    partition: Optional[str] = None
    """slurm: the partition (none: the cluster's default)"""
    gpus_per_task: int = 0
    """slurm: GPUs per run (--gres=gpu:N; Slurm sets CUDA_VISIBLE_DEVICES)"""
    cpus_per_task: Optional[int] = None
    """slurm: CPU cores per run (none: the cluster's default)"""
    mem: Optional[str] = None
    """slurm: memory per run, e.g. 64G (none: the cluster's default)"""
    time_limit: Optional[str] = None
    """slurm: wall-clock limit of a task, e.g. 2-00:00:00; a run still going then checkpoints, is requeued, resumes"""
    signal_seconds: int = 300
    """slurm: how long before the time limit a run is told (SIGUSR1) to checkpoint; more than a checkpoint write takes"""
    max_running: Optional[int] = None
    """slurm: runs at once (the array's %N throttle; none: as many as the cluster gives)"""
    sbatch_lines: List[str] = field(default_factory=list)
    """slurm: more sbatch options, an #SBATCH line each, without their leading -- (the command line would read them
    as flags of this script), e.g. account=rl qos=long "constraint=a100|h100" """
    slurm_task: Optional[str] = None
    """(what the sbatch script runs) run task $SLURM_ARRAY_TASK_ID of this runs file, planned as it stands now"""


GridPoint = Tuple[str, str, int]  # (env id, argument set, seed): one run of the grid


@dataclass
class Run:
    folder: str
    command: List[str]
    resume: bool
    point: GridPoint


PREEMPTED = 75  # the scripts' exit code after a checkpoint on SIGTERM or SIGUSR1
EXIT_CODE_FILE = "exit_code.txt"  # in a run's folder: the exit code of its last launch


def env_ids(games: List[str]) -> List[str]:
    ids = []
    for game in games:
        for name in GAME_SETS.get(game, [game]):
            ids.append(name if ("-v" in name or ":" in name or game == "procgen") else f"{name}-v5")
    return ids


def script_flags(arg_set: str) -> List[str]:
    flags = []
    for token in shlex.split(arg_set):
        name, has_value, value = token.partition("=")
        flags += [f"--{name.replace('_', '-')}"] + ([value] if has_value else [])
    return flags


def slug(arg_set: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", arg_set).strip("_") or "defaults"


def grid(args: Args) -> Iterator[GridPoint]:
    for env_id in env_ids(args.games):
        for arg_set in args.arg_sets:
            for seed in args.seeds:
                yield env_id, arg_set, seed


def run_folder(out: str, point: GridPoint) -> str:
    env_id, arg_set, seed = point
    return os.path.join(out, f"{env_id.replace('/', '_').replace(':', '_')}__{slug(arg_set)}__seed{seed}")


def plan_run(script: str, out: str, point: GridPoint) -> Optional[Run]:
    """The run as its folder stands now: None when finished, resuming from its checkpoint if it has one."""
    folder = run_folder(out, point)
    if glob.glob(os.path.join(folder, "*", "summary.json")):
        return None
    checkpoints = glob.glob(os.path.join(folder, "*", "checkpoint.pt"))
    env_id, arg_set, seed = point
    command = [
        sys.executable,
        script_path(script),
        "--env-id",
        env_id,
        "--seed",
        str(seed),
        *script_flags(arg_set),
        "--output-dir",
        folder,
    ]
    if checkpoints:
        command += ["--resume", os.path.dirname(checkpoints[0])]
    return Run(folder, command, bool(checkpoints), point)


def plan(args: Args) -> List[Run]:
    """Every run of the grid not yet finished; those with a checkpoint resume from it."""
    return [run for run in (plan_run(args.script, args.out, point) for point in grid(args)) if run]


def threads_per_run(workers: int) -> Dict[str, str]:
    """OMP_NUM_THREADS for each of `workers` runs at once on this machine: its cores shared out equally.

    Each run's torch would otherwise take every core, and runs on a CPU would fight over them. On a 2-core CPU, two
    DER runs with one thread each made 12.5 to 13.8 agent steps/s together, one run with both threads 9 (docs/speed.md).
    An OMP_NUM_THREADS already set is the user's choice and is kept; one worker keeps torch's default.
    """
    if workers == 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (a Slurm job or a container may have fewer)
    return {"OMP_NUM_THREADS": str(max(1, cores // workers))}


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon is serving this machine (its control pipe exists)."""
    pipe_directory = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_directory, "control"))


def runs_at_once(args: Args) -> Tuple[int, int]:
    """(runs sharing each GPU, runs at once in all) for a local sweep."""
    runs_per_gpu = args.runs_per_gpu or (8 if mps_running() else 4)
    workers = args.workers or (len(args.gpus) * runs_per_gpu if args.gpus else 1)
    return runs_per_gpu, workers


class GpuSlots:
    """Hands out GPU ids so that at most `per_gpu` runs use each GPU at once (no GPUs: "", the default device, to any
    number of runs)."""

    def __init__(self, gpus: List[str], per_gpu: int):
        self.gpus = gpus
        self.free = queue.Queue()
        for _ in range(per_gpu):
            for gpu in gpus:
                self.free.put(gpu)

    @contextlib.contextmanager
    def slot(self) -> Iterator[str]:
        if not self.gpus:
            yield ""
            return
        gpu = self.free.get()
        try:
            yield gpu
        finally:
            self.free.put(gpu)


def launch(
    run: Run,
    gpu: str,
    started: Callable[[subprocess.Popen], None] = lambda process: None,
    extra_env: Optional[Dict[str, str]] = None,
    own_process_group: bool = False,
) -> int:
    """Run it to the end, its output appended to its log.txt; `started` gets the process (to forward signals to).
    `own_process_group` keeps a terminal's Ctrl-C from reaching the run directly (ForwardSignals passes it on)."""
    os.makedirs(run.folder, exist_ok=True)
    exit_code_file = os.path.join(run.folder, EXIT_CODE_FILE)
    if os.path.exists(exit_code_file):  # an earlier launch's: --status must not report it while this one runs
        os.remove(exit_code_file)
    env = dict(os.environ, **(extra_env or {}))
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(os.path.join(run.folder, "log.txt"), "a") as log:
        process = subprocess.Popen(
            run.command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0 if own_process_group else None,
        )
        started(process)
        code = process.wait()
    with open(exit_code_file, "w") as file:
        file.write(f"{code}\n")
    return code


class ForwardSignals:
    """Passes the signals the sweep receives on to its runs: `passes` maps each signal caught to the one the runs
    get. Locally Ctrl-C (SIGINT) and SIGTERM become SIGTERM, so each run checkpoints and exits with PREEMPTED, and
    main() starts no further run; a Slurm task passes SIGUSR1 and SIGTERM on as they are. close() puts back the
    handlers it replaced."""

    def __init__(self, passes: Dict[int, int]):
        self.passes = passes
        self.received = []
        self.running = []
        self.replaced = {}
        for signum in passes:
            self.replaced[signum] = signal.signal(signum, self.forward)

    def forward(self, signum, frame):
        if not self.received:
            print(f"{signal.Signals(signum).name}: stopping the runs (each checkpoints first)", flush=True)
        self.received.append(signum)
        for process in list(self.running):
            if process.poll() is None:
                process.send_signal(self.passes[signum])

    def started(self, process: subprocess.Popen):
        self.running.append(process)
        if self.received:  # started as a signal came in: pass it on too
            process.send_signal(self.passes[self.received[-1]])

    def close(self):
        for signum, handler in self.replaced.items():
            signal.signal(signum, handler)


def failure(folder: str, code: int, resumes: str = "re-run the sweep to resume it") -> str:
    if code == PREEMPTED:
        why = f"preempted; {resumes}"
    elif code == -signal.SIGTERM:  # the scripts catch SIGTERM from their training loop on: it came before
        why = f"stopped by SIGTERM before its training loop began; {resumes}"
    else:
        why = "failed"
    return f"{why}: exit code {code}, log {os.path.join(folder, 'log.txt')}"


def status(args: Args) -> int:
    """Every run of the grid as its folder stands: exit 0 when all finished."""
    finished = 0
    for point in grid(args):
        run = plan_run(args.script, args.out, point)
        if run is None:
            finished += 1
            continue
        exit_code_file = os.path.join(run.folder, EXIT_CODE_FILE)
        if os.path.exists(exit_code_file):
            state = failure(run.folder, int(open(exit_code_file).read()))
        elif run.resume:
            state = f"interrupted, resumes from its checkpoint: log {os.path.join(run.folder, 'log.txt')}"
        elif os.path.exists(os.path.join(run.folder, "log.txt")):
            state = f"running, or killed before its first checkpoint: log {os.path.join(run.folder, 'log.txt')}"
        else:
            state = "not started"
        print(f"{os.path.basename(run.folder)}: {state}")
    total = len(list(grid(args)))
    print(f"{finished} of {total} runs finished", flush=True)
    return 0 if finished == total else 1


def sbatch_script(args: Args, runs_file: str, tasks: int) -> str:
    """One array job, a task a run; each task plans its run when it starts (see the module docstring)."""
    slurm_folder = os.path.dirname(runs_file)
    options = [
        f"--job-name=sweep-{os.path.basename(os.path.abspath(args.out))}",
        f"--array=0-{tasks - 1}" + (f"%{args.max_running}" if args.max_running else ""),
        f"--output={os.path.join(slurm_folder, '%A_%a.out')}",
        "--open-mode=append",  # a requeued task adds to its log instead of emptying it
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",
    ]
    options += [f"--partition={args.partition}"] if args.partition else []
    options += [f"--gres=gpu:{args.gpus_per_task}"] if args.gpus_per_task else []
    options += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    options += [f"--mem={args.mem}"] if args.mem else []
    options += [f"--time={args.time_limit}"] if args.time_limit else []
    options += [line if line.startswith("-") else f"--{line}" for line in args.sbatch_lines]
    # exec: the batch shell becomes the task's python, so the B:USR1 warning reaches the code that forwards it
    command = shlex.join([sys.executable, os.path.abspath(__file__), "--slurm-task", runs_file])
    return "\n".join(
        [
            "#!/bin/bash",
            "# written by benchmark/sweep.py: a task a run, planned when the task starts",
            *[f"#SBATCH {option}" for option in options],
            f"cd {shlex.quote(ROOT)}",
            f"exec {command}",
            "",
        ]
    )


def submit(args: Args, runs: List[Run]) -> int:
    slurm_folder = os.path.join(os.path.abspath(args.out), "slurm")
    name = f"submission-{len(glob.glob(os.path.join(slurm_folder, 'submission-*.sh'))) + 1}"
    runs_file = os.path.join(slurm_folder, f"{name}.runs.json")
    script = sbatch_script(args, runs_file, len(runs))
    if args.dry_run:
        print(script + f"sbatch {os.path.join(slurm_folder, name + '.sh')}")
        return 0
    if not runs:
        return 0
    if not shutil.which("sbatch"):
        print("error: --backend slurm needs sbatch, which is not on the PATH", file=sys.stderr)
        return 2
    os.makedirs(slurm_folder, exist_ok=True)
    with open(runs_file, "w") as file:
        json.dump(dict(script=args.script, out=os.path.abspath(args.out), points=[run.point for run in runs]), file)
    script_file = os.path.join(slurm_folder, f"{name}.sh")
    with open(script_file, "w") as file:
        file.write(script)
    result = subprocess.run(["sbatch", "--parsable", script_file], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: sbatch {script_file} failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
    print(
        f"submitted array job {job_id}: {len(runs)} tasks, script {script_file}, task logs "
        f"{os.path.join(slurm_folder, job_id + '_TASK.out')}; --status reports the runs",
        flush=True,
    )
    return 0


def slurm_task(runs_file: str) -> int:
    """One array task: plan its run now (finished, resume or new), run it, requeue it if it stopped on our USR1."""
    with open(runs_file) as file:
        submission = json.load(file)
    task = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    point = tuple(submission["points"][int(os.environ["SLURM_ARRAY_TASK_ID"])])
    run = plan_run(submission["script"], submission["out"], point)
    if run is None:
        print(f"task {task}: {run_folder(submission['out'], point)} is finished already", flush=True)
        return 0
    print(
        f"task {task} (restart {os.environ.get('SLURM_RESTART_COUNT', 0)}): "
        f"{'resuming' if run.resume else 'starting'} {shlex.join(run.command)}",
        flush=True,
    )
    # Slurm signals this python (the batch shell); the run is what must checkpoint
    signals = ForwardSignals({signal.SIGUSR1: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM})
    code = launch(run, "", started=signals.started)  # Slurm set CUDA_VISIBLE_DEVICES
    print(
        f"task {task}: "
        + (
            "finished" if code == 0 else failure(run.folder, code, "resumes when requeued (or when the sweep is re-submitted)")
        ),
        flush=True,
    )
    # Only our time-limit warning (USR1) requeues: after a SIGTERM Slurm requeues a preempted task itself, and a
    # scancel'ed one must stay cancelled
    if code == PREEMPTED and signal.SIGUSR1 in signals.received:
        requeue = subprocess.run(["scontrol", "requeue", task], capture_output=True, text=True)
        print(
            f"task {task}: requeued"
            if requeue.returncode == 0
            else f"task {task}: scontrol requeue failed: {requeue.stderr.strip()}",
            flush=True,
        )
    return code


def main(args: Args) -> int:
    if args.slurm_task:
        return slurm_task(args.slurm_task)
    if (args.workers is not None and args.workers < 1) or (args.runs_per_gpu is not None and args.runs_per_gpu < 1):
        print("error: --workers and --runs-per-gpu must be at least 1", file=sys.stderr)
        return 2
    if args.status:
        return status(args)
    runs = plan(args)
    print(f"{len(runs)} runs to do in {args.out} ({sum(r.resume for r in runs)} resuming)", flush=True)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run.command))
    if args.backend == "slurm":
        return submit(args, runs)
    if args.dry_run:
        return 0
    runs_per_gpu, workers = runs_at_once(args)
    if args.gpus:
        mps = "under CUDA MPS" if mps_running() else "no CUDA MPS daemon running (docs/sweeps.md: packing pays most with it)"
        print(f"up to {runs_per_gpu} runs at once on each of GPUs {' '.join(args.gpus)}; {mps}", flush=True)
    gpu_slots = GpuSlots(args.gpus, runs_per_gpu)
    threads = threads_per_run(max(1, min(workers, len(runs))))  # runs at once: no more than there are runs
    if threads:
        print(f"each run gets OMP_NUM_THREADS={threads['OMP_NUM_THREADS']} (set it to choose otherwise)", flush=True)
    stop = ForwardSignals({signal.SIGINT: signal.SIGTERM, signal.SIGTERM: signal.SIGTERM})

    def run_unless_stopped(run: Run) -> Optional[int]:
        with gpu_slots.slot() as gpu:
            if stop.received:
                return None  # not started
            return launch(run, gpu, started=stop.started, extra_env=threads, own_process_group=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(run_unless_stopped, runs))
    stop.close()
    unfinished = [(run, code) for run, code in zip(runs, codes) if code not in (0, None)]
    for run, code in unfinished:
        print(failure(run.folder, code), file=sys.stderr)
    print(f"{codes.count(0)} of {len(runs)} runs finished", flush=True)
    if stop.received:
        print(f"stopped; {codes.count(None)} runs not started; the same command resumes the sweep", flush=True)
        failed = [code for code in codes if code not in (0, None, PREEMPTED, -signal.SIGTERM)]
        return 1 if failed else PREEMPTED
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
