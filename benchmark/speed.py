"""Speed of each training script and of its parts, per scale and bottleneck, on the device at hand.

    python benchmark/speed.py                      # the default table (see Args)
    python benchmark/speed.py --quick              # tiny settings, a minute on a CPU
    python benchmark/speed.py --modes eager cudagraphs compile+cudagraphs --scales 1 4 8   # on a GPU
    python benchmark/speed.py --scripts rainbow_pruned --poolings flatten --settings method=rigl sparsify=psi

Everything is measured in this one process, after warm-up, through the scripts' own functions (make_env,
QNetwork, DeviceReplay, select_actions, make_update, accelerated, main), so it times what a run executes:

  env_sps            agent steps per second of the environments alone, random actions
  act_ms             one training action selection (fresh noise with --noisy), the copy to the host included (median)
  sample_ms          one prioritized replay sample (median)
  update_ms          one gradient update: sample, loss, backward, optimizer step, new priorities (median)
  floor_sps          num_envs / (env step + act + update * updates per step): the loop with no overhead at all
  eval_act_ms        one evaluation step's greedy actions (noise off) for all --eval-episodes games at once (median)
  eval_env_ms        one evaluation step of the --eval-episodes envs (median); with eval_act_ms, what each step of an
                     evaluation costs while all its games go on ("-" for scripts that do not evaluate by default)
  loop_sps           the whole loop's agent steps per second once learning runs (main() for --loop-steps steps)
  efficiency         loop_sps / floor_sps (above 1 where the device trains while the host steps the envs)
  update_vs_flatten  update_ms over the first script's flatten at the same mode and scale (the paper: GAP is cheapest);
                     scripts without --pooling (SoftMoE-1) get one row per scale, pooling "-"

Writes speed.csv and speed.md into --out and prints the markdown table.
"""

import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import List, Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import load_script, training_parts  # noqa: E402

COLUMNS = [
    "script",
    "settings",
    "mode",
    "device",
    "num_envs",
    "scale",
    "pooling",
    "params_bottleneck",
    "env_sps",
    "act_ms",
    "sample_ms",
    "update_ms",
    "floor_sps",
    "eval_act_ms",
    "eval_env_ms",
    "loop_sps",
    "efficiency",
    "update_vs_flatten",
]


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["rainbow_impala_gap"])
    """scripts of cleanrl_gap/ to measure (names without .py)"""
    modes: List[
        Literal["eager", "compile", "cudagraphs", "compile+cudagraphs", "tf32", "cudagraphs+tf32", "compile+cudagraphs+tf32"]
    ] = field(default_factory=lambda: ["eager"])
    """how the update and action selection run: plain, torch.compile, CUDA graphs, or both; `+tf32` allows TF32
    matmuls and convolutions (the scripts' --tf32; CUDA only)"""
    scales: List[int] = field(default_factory=lambda: [1, 4])
    """psi width multipliers"""
    poolings: List[str] = field(default_factory=lambda: ["flatten", "gap", "max"])
    """bottlenecks"""
    settings: List[str] = field(default_factory=list)
    """NAME=VALUE script args, applied to the scripts that have them (e.g. method=rigl sparsify=psi)"""
    env_id: str = "Pong-v5"
    """the environment (envpool)"""
    num_envs: int = 1
    """environments acting in parallel (the replay ratio is held)"""
    buffer_size: int = 1_000_000
    """replay capacity for the sample and update timings and the loop (sampling cost grows with it)"""
    repeats: int = 30
    """timed repetitions of each part (the median is reported)"""
    env_steps: int = 1000
    """env steps timed for env_sps"""
    loop_steps: int = 2000
    """agent steps of the whole loop measured after learning starts"""
    learning_starts: int = 1000
    """agent steps of random acting before the loop's learning starts"""
    cuda: bool = True
    """use CUDA when available"""
    quick: bool = False
    """tiny settings for a smoke test: scale 1, flatten and gap, small replay, few repeats"""
    out: str = "benchmark/results/speed"
    """folder for speed.csv and speed.md"""


def quick_settings(args: Args) -> Args:
    return replace(
        args,
        scales=[1],
        poolings=["flatten", "gap"],
        buffer_size=2000,
        repeats=3,
        env_steps=50,
        loop_steps=80,
        learning_starts=100,
    )


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 5) -> float:
    """Median wall time of fn() in milliseconds, the device drained before and after each call."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def env_steps_per_second(module, script_args, steps: int) -> float:
    envs = module.make_env(script_args)
    envs.reset()
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, envs.num_actions, script_args.num_envs) for _ in range(steps)]
    envs.step(actions[0])
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * script_args.num_envs / elapsed


def evaluation_env_ms(module, script_args, repeats: int):
    """Median time of one step of the evaluation's envs, all `eval_episodes` of them (random actions); None for a
    script that does not evaluate by default."""
    games = script_args.eval_episodes
    if games == 0:
        return None
    envs = module.make_env(script_args, num_envs=games, seed=script_args.seed)
    envs.reset()
    rng = np.random.default_rng(0)
    timed = median_ms(lambda: envs.step(rng.integers(0, envs.num_actions, games)), repeats, torch.device("cpu"))
    envs.close()
    return timed


def measure_parts(module, script_args, num_actions: int, device: torch.device, repeats: int) -> dict:
    parts = training_parts(module, script_args, device, num_actions)
    act = module.accelerated(lambda obs, epsilon: module.select_actions(parts.net, obs, epsilon, with_noise=True), script_args)
    obs = parts.replay.sample(script_args.num_envs)["obs"]
    epsilon = torch.full((), 0.01, device=device)
    eval_act_ms = None
    if script_args.eval_episodes > 0:  # as evaluate() acts: every game's stack in one forward, mean weights
        eval_obs = parts.replay.sample(script_args.eval_episodes)["obs"]
        eval_act_ms = median_ms(
            lambda: module.select_actions(parts.net, eval_obs, script_args.eval_epsilon, with_noise=False).cpu(),
            repeats,
            device,
        )
    return dict(
        params_bottleneck=parts.net.bottleneck.weight.numel(),
        act_ms=median_ms(lambda: act(obs, epsilon).cpu(), repeats, device),
        sample_ms=median_ms(lambda: parts.replay.sample(script_args.batch_size), repeats, device),
        update_ms=median_ms(parts.update, repeats, device),
        eval_act_ms=eval_act_ms,
    )


def loop_steps_per_second(module, script_args, loop_steps: int, learning_starts: int) -> float:
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(io.StringIO()):
        summary = module.main(
            replace(
                script_args,
                output_dir=output_dir,
                learning_starts=learning_starts,
                total_timesteps=learning_starts + loop_steps,
                progress_seconds=1e9,
                diagnostics_every=10**12,
                iteration_steps=10**12,
                eval_episodes=0,  # the loop alone: no evaluation at the end (eval_act_ms and eval_env_ms time it)
            )
        )
    return summary["sps"]


def measure(args: Args, on_row=lambda row: None) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows, flatten_update_ms = [], {}
    for name in args.scripts:
        module = load_script(name)
        base = module.Args(env_id=args.env_id, num_envs=args.num_envs, buffer_size=args.buffer_size, cuda=args.cuda)
        settings = script_settings(base, args.settings)
        base = replace(base, **settings)
        env_sps = env_steps_per_second(module, base, args.env_steps)
        eval_env_ms = evaluation_env_ms(module, base, args.repeats)
        num_actions = module.make_env(base, num_envs=1).num_actions
        for mode in args.modes:
            if ("cudagraphs" in mode or "tf32" in mode) and device.type != "cuda":
                print(f"skipping mode {mode}: it needs a CUDA device", file=sys.stderr)
                continue
            for scale in args.scales:
                for pooling in args.poolings if hasattr(base, "pooling") else ["-"]:
                    script_args = replace(
                        base,
                        scale=scale,
                        compile="compile" in mode,
                        cudagraphs="cudagraphs" in mode,
                        tf32="tf32" in mode,
                        **({"pooling": pooling} if hasattr(base, "pooling") else {}),
                    )
                    print(f"measuring {name} {mode} scale {scale} {pooling} ...", file=sys.stderr, flush=True)
                    parts = measure_parts(module, script_args, num_actions, device, args.repeats)
                    updates_per_step = args.num_envs / script_args.train_frequency
                    step_seconds = (
                        1 / env_sps * args.num_envs + parts["act_ms"] / 1000 + updates_per_step * parts["update_ms"] / 1000
                    )
                    loop_sps = loop_steps_per_second(module, script_args, args.loop_steps, args.learning_starts)
                    if pooling == "flatten":
                        flatten_update_ms.setdefault((mode, scale), parts["update_ms"])
                    reference_ms = flatten_update_ms.get((mode, scale))
                    rows.append(
                        dict(
                            script=name,
                            settings=" ".join(f"{k}={v}" for k, v in settings.items()) or "-",
                            mode=mode,
                            device=device_name,
                            num_envs=args.num_envs,
                            scale=scale,
                            pooling=pooling,
                            **parts,
                            env_sps=env_sps,
                            floor_sps=args.num_envs / step_seconds,
                            eval_env_ms=eval_env_ms,
                            loop_sps=loop_sps,
                            efficiency=loop_sps * step_seconds / args.num_envs,
                            update_vs_flatten=parts["update_ms"] / reference_ms if reference_ms else None,
                        )
                    )
                    on_row(rows[-1])
    return rows


def script_settings(script_args, settings: list) -> dict:
    """The NAME=VALUE pairs this script's Args has, converted to the fields' types."""
    chosen = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if hasattr(script_args, name):
            current = getattr(script_args, name)
            chosen[name] = value.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(value)
    return chosen


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list, columns: list = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(args: Args):
    if args.quick:
        args = quick_settings(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.csv"), "w", newline="") as f:  # row by row: a long sweep keeps its rows
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        rows = measure(
            args,
            on_row=lambda row: (
                writer.writerow(row),
                f.flush(),
                print(markdown_table([row]).splitlines()[-1], file=sys.stderr),
            ),
        )
    table = markdown_table(rows)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(table)
    print(table)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
