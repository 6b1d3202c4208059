"""Where one gradient update's time goes: a script's own update, split into its parts by the profiler, beside the whole
update timed in the modes a run uses.

    python benchmark/update_breakdown.py --quick                      # tiny settings, a minute on a CPU
    python benchmark/update_breakdown.py --scales 1 4 8 --poolings flatten gap --modes eager cudagraphs compile+cudagraphs

The update is the script's (make_training's, as main() builds it). For the parts, an eager update runs under
torch.profiler `--profiled-updates` times with each of its stages wrapped in a named range (the wrappers call the
script's own functions and change nothing they compute; they are removed afterwards):

  sample            the prioritized replay sample
  online_forward    the online network on obs, noise per sample (the loss side)
  target_forward    the target network on next_obs, one noise draw for the batch
  selector_forward  double DQN's online network on next_obs, the target's noise (absent without --double-dqn)
  loss_rest         the rest of c51_losses: the C51 projection, cross-entropy and the taken action's Q-value
  backward          loss.backward()
  optimizer         Adam's step
  priorities        the new priorities and the max priority
  other             the update's remaining work (importance weights, zero_grad, the loss sums)

For each part: host_ms, its time on the host (launches included, and the profiler's own overhead: compare parts with
one another, not with update_ms), and on CUDA device_ms, the time of the kernels it launched (memory copies and sets
included), and kernels, their count (medians over the profiled updates). Then, for each of --modes, update_ms (the
median of the whole update timed as speed.py times it, without the profiler), and on CUDA, from `--profiled-updates`
updates of that mode under the profiler (compiled and graph-captured ones included), kernels and kernel_ms per
update, and idle_ms = update_ms - kernel_ms: what launches and the gaps between kernels cost beyond the work.

Writes parts.csv, updates.csv and update_breakdown.md into --out and prints the markdown tables.
"""

import contextlib
import csv
import os
import sys
from dataclasses import dataclass, field, replace
from typing import List, Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import load_script, training_parts  # noqa: E402
from benchmark.speed import markdown_table, median_ms, script_settings  # noqa: E402

PARTS = [
    "sample",
    "online_forward",
    "target_forward",
    "selector_forward",
    "loss_rest",
    "backward",
    "optimizer",
    "priorities",
    "other",
]
PART_COLUMNS = ["script", "device", "scale", "pooling", "part", "host_ms", "device_ms", "kernels"]
UPDATE_COLUMNS = ["script", "device", "scale", "pooling", "mode", "update_ms", "kernel_ms", "idle_ms", "kernels"]


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["rainbow_impala_gap"])
    """scripts of cleanrl_gap/ to measure (names without .py)"""
    scales: List[int] = field(default_factory=lambda: [1, 4, 8])
    """psi width multipliers"""
    poolings: List[str] = field(default_factory=lambda: ["flatten", "gap"])
    """bottlenecks (scripts without --pooling get one row per scale)"""
    modes: List[Literal["eager", "compile", "cudagraphs", "compile+cudagraphs"]] = field(default_factory=lambda: ["eager"])
    """how the whole update runs for update_ms (the parts are always profiled eager)"""
    settings: List[str] = field(default_factory=list)
    """NAME=VALUE script args, applied to the scripts that have them (e.g. double_dqn=false)"""
    buffer_size: int = 100_000
    """replay capacity (filled with random frames; sampling searches block sums, so its cost grows slowly with it)"""
    frame_size: int = 84
    """frame size of the replay and the networks"""
    repeats: int = 50
    """timed updates for each mode's update_ms (the median is reported)"""
    profiled_updates: int = 5
    """updates run under the profiler for the parts (after two warm-up updates)"""
    cuda: bool = True
    """use CUDA when available"""
    quick: bool = False
    """tiny settings for a smoke test: scale 1, flatten and gap, 24x24 frames, a small replay, few repeats"""
    out: str = "benchmark/results/update_breakdown"
    """folder for the tables"""


def quick_settings(args: Args) -> Args:
    return replace(
        args, scales=[1], poolings=["flatten", "gap"], buffer_size=2000, frame_size=24, repeats=3, profiled_updates=2
    )


class Ranges:
    """Wraps the stages of a script's update in profiler ranges named after PARTS (plus "c51_losses" and "update"),
    by replacing, for the duration of a `with` block, the functions the update looks up when it runs: the script's
    c51_losses, the replay's sample and update_priorities, the optimizer's step, both networks' forward and
    torch.Tensor.backward. Each wrapper calls the original with the same arguments."""

    def __init__(self, module, parts):
        self.module, self.parts = module, parts

    @staticmethod
    def ranged(name: str, function):
        def call(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)

        return call

    def __enter__(self):
        net, target_net, replay = self.parts.net, self.parts.target_net, self.parts.replay
        self.original_c51_losses = self.module.c51_losses
        self.original_backward = torch.Tensor.backward
        self.module.c51_losses = self.ranged("c51_losses", self.module.c51_losses)
        torch.Tensor.backward = self.ranged("backward", torch.Tensor.backward)
        replay.sample = self.ranged("sample", replay.sample)
        replay.update_priorities = self.ranged("priorities", replay.update_priorities)
        self.parts.optimizer.step = self.ranged("optimizer", self.parts.optimizer.step)
        target_net.forward = self.ranged("target_forward", target_net.forward)
        online = self.ranged("online_forward", net.forward)
        selector = self.ranged("selector_forward", net.forward)

        def net_forward(*args, **kwargs):  # in the update, the online network runs with gradients, the selector without
            if torch.is_grad_enabled():
                return online(*args, **kwargs)
            return selector(*args, **kwargs)

        net.forward = net_forward
        return self

    def __exit__(self, *exc):
        self.module.c51_losses = self.original_c51_losses
        torch.Tensor.backward = self.original_backward
        for obj, name in [
            (self.parts.replay, "sample"),
            (self.parts.replay, "update_priorities"),
            (self.parts.optimizer, "step"),
            (self.parts.net, "forward"),
            (self.parts.target_net, "forward"),
        ]:
            delattr(obj, name)  # the instance attribute goes; the class's method shows through again


def launched_within(start_us: float, end_us: float, launchers: list) -> tuple:
    """Kernel count and total kernel time (ms) of the ops that started within [start_us, end_us] on the host, on any
    thread (the autograd engine launches backward's kernels from its own thread on CUDA)."""
    count, total_us = 0, 0.0
    for event in launchers:
        if start_us <= event.time_range.start <= end_us:
            count += len(event.kernels)
            total_us += sum(kernel.duration for kernel in event.kernels)
    return count, total_us / 1000


def device_work(events, updates: int) -> tuple:
    """Kernels (memory copies and sets included) per update and their time in ms per update, from the device-side
    events of `updates` profiled updates: these include the kernels of a replayed CUDA graph, which no host op
    launches one by one."""
    kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(event.time_range.end - event.time_range.start for event in kernels)
    return len(kernels) / updates, total_us / 1000 / updates


def profiled_update_work(update, updates: int, device: torch.device) -> tuple:
    """device_work() of `updates` calls of update() (after two warm-up calls), on a CUDA device."""
    for _ in range(2):
        update()
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(updates):
            update()
        torch.cuda.synchronize(device)
    return device_work(profiler.events(), updates)


def profile_parts(module, parts, updates: int, device: torch.device) -> dict:
    """host_ms, device_ms and kernels of each part: medians over `updates` profiled eager updates."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(2):  # warm-up: allocator, cuDNN algorithm choice
        parts.update()
    with Ranges(module, parts), torch.profiler.profile(activities=activities) as profiler:
        for _ in range(updates):
            with torch.profiler.record_function("update"):
                parts.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    events = profiler.events()
    launchers = [event for event in events if event.kernels]
    named = {}  # range name -> [(host_ms, device_ms, kernels)], one entry per update, in order
    for event in events:
        if event.name in PARTS + ["c51_losses", "update"]:
            kernels, device_ms = launched_within(event.time_range.start, event.time_range.end, launchers)
            named.setdefault(event.name, []).append((event.cpu_time_total / 1000, device_ms, kernels))
    top_level = ["sample", "c51_losses", "backward", "optimizer", "priorities"]  # the ranges directly inside "update"
    per_update = []
    for i in range(updates):
        measured = {name: np.array(values[i]) for name, values in named.items()}
        forwards = measured["online_forward"] + measured["target_forward"] + measured.get("selector_forward", 0.0)
        measured["loss_rest"] = measured["c51_losses"] - forwards
        measured["other"] = measured["update"] - sum(measured[name] for name in top_level)
        per_update.append(measured)
    result = {}
    for part in PARTS + ["update"]:
        if part in per_update[0]:
            host_ms, device_ms, kernels = np.median([measured[part] for measured in per_update], axis=0)
            result[part] = dict(host_ms=float(host_ms), device_ms=float(device_ms), kernels=int(round(kernels)))
    return result


def measure(args: Args, on_rows=lambda part_rows, update_rows: None) -> tuple:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    on_cuda = device.type == "cuda"
    part_rows, update_rows = [], []
    for name in args.scripts:
        module = load_script(name)
        base = module.Args(buffer_size=args.buffer_size, frame_size=args.frame_size, cuda=args.cuda)
        base = replace(base, **script_settings(base, args.settings))
        for scale in args.scales:
            for pooling in args.poolings if hasattr(base, "pooling") else ["-"]:
                eager_args = replace(base, scale=scale, **({"pooling": pooling} if hasattr(base, "pooling") else {}))
                print(f"profiling {name} scale {scale} {pooling} ...", file=sys.stderr, flush=True)
                config = dict(script=name, device=device_name, scale=scale, pooling=pooling)
                profiled = profile_parts(module, training_parts(module, eager_args, device), args.profiled_updates, device)
                new_part_rows = []
                for part in PARTS:
                    if part in profiled:
                        measured = profiled[part]
                        new_part_rows.append(
                            dict(
                                config,
                                part=part,
                                host_ms=measured["host_ms"],
                                device_ms=measured["device_ms"] if on_cuda else None,
                                kernels=measured["kernels"] if on_cuda else None,
                            )
                        )
                new_update_rows = []
                for mode in args.modes:
                    if "cudagraphs" in mode and not on_cuda:
                        print(f"skipping mode {mode}: it needs a CUDA device", file=sys.stderr)
                        continue
                    mode_args = replace(eager_args, compile="compile" in mode, cudagraphs="cudagraphs" in mode)
                    torch._dynamo.reset()
                    update = training_parts(module, mode_args, device).update
                    row = dict(config, mode=mode, update_ms=median_ms(update, args.repeats, device))
                    row.update(kernels=None, kernel_ms=None, idle_ms=None)
                    if on_cuda:
                        kernels, kernel_ms = profiled_update_work(update, args.profiled_updates, device)
                        row.update(kernels=round(kernels), kernel_ms=kernel_ms, idle_ms=row["update_ms"] - kernel_ms)
                    new_update_rows.append(row)
                part_rows += new_part_rows
                update_rows += new_update_rows
                on_rows(new_part_rows, new_update_rows)
    return part_rows, update_rows


def main(args: Args):
    if args.quick:
        args = quick_settings(args)
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as files:  # row by row: a long measurement keeps what it has measured
        parts_file = files.enter_context(open(os.path.join(args.out, "parts.csv"), "w", newline=""))
        updates_file = files.enter_context(open(os.path.join(args.out, "updates.csv"), "w", newline=""))
        parts_csv = csv.DictWriter(parts_file, fieldnames=PART_COLUMNS)
        updates_csv = csv.DictWriter(updates_file, fieldnames=UPDATE_COLUMNS)
        parts_csv.writeheader()
        updates_csv.writeheader()

        def write_rows(new_part_rows, new_update_rows):
            parts_csv.writerows(new_part_rows)
            updates_csv.writerows(new_update_rows)
            parts_file.flush()
            updates_file.flush()

        part_rows, update_rows = measure(args, on_rows=write_rows)
    tables = markdown_table(part_rows, PART_COLUMNS) + "\n" + markdown_table(update_rows, UPDATE_COLUMNS)
    with open(os.path.join(args.out, "update_breakdown.md"), "w") as f:
        f.write(tables)
    print(tables)
    return part_rows, update_rows


if __name__ == "__main__":
    main(tyro.cli(Args))
