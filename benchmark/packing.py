"""Runs per GPU: how many agent steps per second several independent runs make together on one device.

    python benchmark/packing.py                                     # the flagship, flatten and GAP at scale 4, 1 2 4 8 runs
    python benchmark/packing.py --script der_atari100k_gap --env-id KungFuMaster-v5 --counts 1 4 8 \\
        --arg-sets "pooling=flatten scale=1 cudagraphs" "pooling=gap scale=4 cudagraphs"
    nvidia-cuda-mps-control -d; python benchmark/packing.py --tag mps; echo quit | nvidia-cuda-mps-control   # with MPS

What decides the cost of a grid of runs is GPU hours per run, not one run's speed: a run with one env and batch-32
updates leaves most of a large GPU idle, so several runs on one GPU may finish more work per hour. For each argument
set and each count N, this starts N runs of the script at once, as `benchmark/sweep.py --workers N` would (its own
process each, seeds 1..N, the cores shared out with OMP_NUM_THREADS, one device through CUDA_VISIBLE_DEVICES=--gpu),
waits until every run has made --warmup-updates updates (replay filled to learning_starts, CUDA graphs captured,
compiled), then counts the agent steps each run makes over the same --measure-seconds window (from its progress lines,
printed every second) and stops them. Evaluations and checkpoints are turned off (--eval-episodes 0 --checkpoint-every
0), since they pause training at points that differ from run to run; an evaluation's cost is measured by speed.py.

  runs            N, the runs sharing the device
  per_run_sps     the mean of the runs' agent steps per second in the window (slowest and fastest beside it)
  aggregate_sps   the sum over the N runs: what the device gets done
  vs_one          aggregate_sps over that of one run alone with the same arguments and tag
  gpu_h_per_1M    device hours per million agent steps at aggregate_sps (a 200M-frame Atari run is 50M steps)

Writes packing.csv and packing.md into --out, each run's output into --out/logs/, and prints the markdown table.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import ROOT, script_path  # noqa: E402
from benchmark.sweep import script_flags, slug, threads_per_run  # noqa: E402

COLUMNS = ["script", "env_id", "settings", "tag", "runs", "per_run_sps", "slowest_sps", "fastest_sps"]
COLUMNS += ["aggregate_sps", "vs_one", "gpu_h_per_1M"]
PROGRESS_LINE = re.compile(r"^step ([\d,]+)/[\d,]+ .*\| updates ([\d,]+)")


@dataclass
class Args:
    script: str = "rainbow_impala_gap"
    """the script of cleanrl_gap/ to run"""
    env_id: str = "Pong-v5"
    """the env every run plays"""
    arg_sets: List[str] = field(
        default_factory=lambda: ["pooling=flatten scale=4 cudagraphs", "pooling=gap scale=4 cudagraphs"]
    )
    """argument sets as benchmark/sweep.py takes them ("name=value" pairs and bare flags), one group of rows each"""
    counts: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """how many runs share the device, one row each"""
    gpu: str = "0"
    """CUDA_VISIBLE_DEVICES of every run ("" leaves it as it is)"""
    warmup_updates: int = 100
    """updates each run makes before the window opens (CUDA graph capture and compilation happen in the first ones)"""
    measure_seconds: float = 20.0
    """the length of the window in which every run's steps are counted"""
    timeout_seconds: float = 600.0
    """a group of runs that has not finished its window by then is stopped and reported"""
    tag: str = ""
    """a label for the rows, e.g. "mps" when an MPS control daemon serves the device"""
    out: str = "benchmark/results/packing"
    """where packing.csv, packing.md and the runs' logs go"""


Progress = List[Tuple[float, int, int]]  # (when it was printed, agent step, updates) for each progress line of a run


def read_progress_line(line: str) -> Optional[Tuple[int, int]]:
    """(agent step, updates) from one of the scripts' progress lines, None from any other line."""
    match = PROGRESS_LINE.match(line)
    if match is None:
        return None
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def measurement_window(progresses: List[Progress], warmup_updates: int, seconds: float) -> Optional[Tuple[float, float]]:
    """(start, end): `seconds` that begin a second after the last run to warm up reported warmup_updates updates,
    once every run has reported at or after its end (so each run's steps at both ends are known); None before."""
    warm_since = []
    for progress in progresses:
        warm = [seen_at for seen_at, _, updates in progress if updates >= warmup_updates]
        if not warm:
            return None
        warm_since.append(warm[0])
    start = max(warm_since) + 1.0
    end = start + seconds
    if all(progress[-1][0] >= end for progress in progresses):
        return start, end
    return None


def steps_per_second(progress: Progress, window: Tuple[float, float]) -> float:
    """A run's agent steps per second over the window, its steps at each end interpolated between progress lines."""
    times = [seen_at for seen_at, _, _ in progress]
    steps = [step for _, step, _ in progress]
    start, end = window
    return float(np.interp(end, times, steps) - np.interp(start, times, steps)) / (end - start)


class WatchedRun:
    """One run of the script in its own process group; a thread keeps the time of each progress line it prints."""

    def __init__(self, command: List[str], env: Dict[str, str], log_path: str):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0
        )
        self.progress: Progress = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.process.stdout:
            seen_at = time.time()
            self.log.write(line)
            self.log.flush()
            reported = read_progress_line(line)
            if reported is not None:
                self.progress.append((seen_at, *reported))

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.reader.join(timeout=5)
        self.log.close()


def run_command(args: Args, arg_set: str, seed: int, output_dir: str) -> List[str]:
    command = [sys.executable, script_path(args.script), "--env-id", args.env_id, "--seed", str(seed)]
    command += script_flags(arg_set)
    command += ["--eval-episodes", "0", "--checkpoint-every", "0", "--progress-seconds", "1"]
    command += ["--output-dir", output_dir]
    return command


def measure(args: Args, arg_set: str, count: int, scratch: str) -> List[float]:
    """Each run's agent steps per second over one window in which all `count` runs are warm."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **threads_per_run(count))
    if args.gpu:
        env["CUDA_VISIBLE_DEVICES"] = args.gpu
    log_folder = os.path.join(args.out, "logs", f"{slug(arg_set)}__{args.tag or 'plain'}__{count}runs")
    os.makedirs(log_folder, exist_ok=True)
    runs = []
    for seed in range(1, count + 1):
        command = run_command(args, arg_set, seed, os.path.join(scratch, f"{slug(arg_set)}_{count}_{seed}"))
        runs.append(WatchedRun(command, env, os.path.join(log_folder, f"seed{seed}.txt")))
    deadline = time.time() + args.timeout_seconds
    try:
        while True:
            window = measurement_window([list(run.progress) for run in runs], args.warmup_updates, args.measure_seconds)
            if window is not None:
                break
            ended = [run for run in runs if run.process.poll() is not None]
            if ended:
                code = ended[0].process.returncode
                raise RuntimeError(f"a run ended (exit code {code}) before the window closed; see {log_folder}")
            if time.time() > deadline:
                raise RuntimeError(f"the runs were not measured within {args.timeout_seconds:.0f} s; see {log_folder}")
            time.sleep(0.5)
    finally:
        for run in runs:
            run.stop()
    return [steps_per_second(run.progress, window) for run in runs]


def markdown(rows: List[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[column]) for column in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: List[dict], out: str) -> str:
    with open(os.path.join(out, "packing.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    with open(os.path.join(out, "packing.md"), "w") as file:
        file.write(table)
    return table


def main(args: Args) -> List[dict]:
    """Every row it could measure; a group of runs that fails is reported and the next one goes on."""
    if min(args.counts) < 1:
        raise SystemExit("error: --counts must all be at least 1")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the runs' own folders (TensorBoard events), not kept
        for arg_set in args.arg_sets:
            alone = None
            for count in sorted(args.counts):
                try:
                    per_run = measure(args, arg_set, count, scratch)
                except RuntimeError as error:
                    print(f"{arg_set!r}, {count} runs: {error}", file=sys.stderr, flush=True)
                    continue
                aggregate = sum(per_run)
                if count == 1:
                    alone = aggregate
                row = dict(
                    script=args.script,
                    env_id=args.env_id,
                    settings=arg_set,
                    tag=args.tag or "-",
                    runs=count,
                    per_run_sps=round(aggregate / count, 1),
                    slowest_sps=round(min(per_run), 1),
                    fastest_sps=round(max(per_run), 1),
                    aggregate_sps=round(aggregate, 1),
                    vs_one=round(aggregate / alone, 2) if alone else "-",
                    gpu_h_per_1M=round(1e6 / aggregate / 3600, 3),
                )
                rows.append(row)
                write_tables(rows, args.out)  # after every row: a stopped measurement keeps what it has
                print(markdown([row]).splitlines()[-1], flush=True)
    print(write_tables(rows, args.out))
    return rows


if __name__ == "__main__":
    # SIGTERM (a `timeout`, a job's end) as an exception, so that measure() stops the runs on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main(tyro.cli(Args))
