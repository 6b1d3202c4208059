"""Run a grid of experiments on this machine: script x games x seeds x argument sets.

    python benchmark/sweep.py --script rainbow_impala_gap --games paper20 --seeds 1 2 3 4 5 \\
        --arg-sets "pooling=flatten scale=4" "pooling=gap scale=4" --workers 4 --gpus 0 1 --out runs/sweep
    python benchmark/sweep.py ... --dry-run        # print the commands only

Each run gets its own folder OUT/{game}__{arg set}__seed{seed}/ (the script's run folder inside it, and log.txt).
A run whose folder already holds a summary.json is skipped; one with a checkpoint.pt (killed, preempted) goes on
with --resume; so a sweep is re-launched as it was after any failure. Runs go to a pool of --workers processes, and
GPUs are handed out round-robin through CUDA_VISIBLE_DEVICES. A run that fails is reported with its log and exit
code, never dropped, and the sweep then exits non-zero. Named game sets: paper20 (the 20 games of the paper, after
Obando Ceron et al. 2024), atari60 (Dopamine's 60), atari100k (the 26 of Atari 100k), procgen (the 16 games).
The Slurm backend is still to come.
"""

import glob
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import ROOT, script_path  # noqa: E402

GAME_SETS = {
    "paper20": ["Asterix", "SpaceInvaders", "Breakout", "Pong", "Qbert", "DemonAttack", "Seaquest", "WizardOfWor",
                "RoadRunner", "BeamRider", "Frostbite", "CrazyClimber", "Assault", "Krull", "Boxing", "Jamesbond",
                "Kangaroo", "UpNDown", "Gopher", "Hero"],
    "atari60": ["AirRaid", "Alien", "Amidar", "Assault", "Asterix", "Asteroids", "Atlantis", "BankHeist", "BattleZone",
                "BeamRider", "Berzerk", "Bowling", "Boxing", "Breakout", "Carnival", "Centipede", "ChopperCommand",
                "CrazyClimber", "DemonAttack", "DoubleDunk", "ElevatorAction", "Enduro", "FishingDerby", "Freeway",
                "Frostbite", "Gopher", "Gravitar", "Hero", "IceHockey", "Jamesbond", "JourneyEscape", "Kangaroo",
                "Krull", "KungFuMaster", "MontezumaRevenge", "MsPacman", "NameThisGame", "Phoenix", "Pitfall", "Pong",
                "Pooyan", "PrivateEye", "Qbert", "Riverraid", "RoadRunner", "Robotank", "Seaquest", "Skiing",
                "Solaris", "SpaceInvaders", "StarGunner", "Tennis", "TimePilot", "Tutankham", "UpNDown", "Venture",
                "VideoPinball", "WizardOfWor", "YarsRevenge", "Zaxxon"],
    "atari100k": ["Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
                  "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
                  "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
                  "RoadRunner", "Seaquest", "UpNDown"],
    "procgen": ["bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot", "heist",
                "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot"],
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
    workers: int = 1
    """runs at once"""
    gpus: List[str] = field(default_factory=list)
    """GPU ids handed out round-robin through CUDA_VISIBLE_DEVICES (none: the default device)"""
    out: str = "runs/sweep"
    """the sweep's folder"""
    dry_run: bool = False
    """print the commands and do nothing"""


@dataclass
class Run:
    folder: str
    command: List[str]
    resume: bool


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


def plan(args: Args) -> List[Run]:
    """Every run of the grid not yet finished; those with a checkpoint resume from it."""
    runs = []
    for env_id in env_ids(args.games):
        for arg_set in args.arg_sets:
            for seed in args.seeds:
                folder = os.path.join(args.out, f"{env_id.replace('/', '_').replace(':', '_')}__{slug(arg_set)}__seed{seed}")
                if glob.glob(os.path.join(folder, "*", "summary.json")):
                    continue
                checkpoints = glob.glob(os.path.join(folder, "*", "checkpoint.pt"))
                command = [sys.executable, script_path(args.script), "--env-id", env_id, "--seed", str(seed),
                           *script_flags(arg_set), "--output-dir", folder]
                if checkpoints:
                    command += ["--resume", os.path.dirname(checkpoints[0])]
                runs.append(Run(folder, command, bool(checkpoints)))
    return runs


def launch(run: Run, gpu: str) -> int:
    os.makedirs(run.folder, exist_ok=True)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {}))
    with open(os.path.join(run.folder, "log.txt"), "a") as log:
        return subprocess.run(run.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def main(args: Args) -> int:
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    runs = plan(args)
    print(f"{len(runs)} runs to do in {args.out} ({sum(r.resume for r in runs)} resuming)", flush=True)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run.command))
        return 0
    gpus = [args.gpus[i % len(args.gpus)] if args.gpus else "" for i in range(len(runs))]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        codes = list(pool.map(launch, runs, gpus))
    failed = [(run, code) for run, code in zip(runs, codes) if code != 0]
    for run, code in failed:
        why = "preempted; re-run the sweep to resume it" if code == 75 else "failed"
        print(f"{why}: exit code {code}, log {os.path.join(run.folder, 'log.txt')}", file=sys.stderr)
    print(f"{len(runs) - len(failed)} of {len(runs)} runs finished", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
