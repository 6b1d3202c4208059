"""Load the single-file scripts of cleanrl_gap/ as modules (they are scripts, not a package), and take their training
parts from the builder their main() uses, for the benchmarks and tests."""

import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["rainbow_impala_gap", "rainbow_softmoe1", "rainbow_pruned", "der_atari100k_gap"]  # the ALE scripts
ALL_SCRIPTS = [*SCRIPTS, "rainbow_procgen_gap"]  # every script in cleanrl_gap/, in the order the README lists them


def script_path(name: str) -> str:
    return os.path.join(ROOT, "cleanrl_gap", f"{name}.py")


def load_script(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fill_replay(replay):
    """Fills the replay with random frames, every transition sampleable at priority 1 (sampling cost depends on sizes,
    not on contents)."""
    replay.frames.random_(0, 256)
    replay.episode_end.zero_()
    replay.adds = replay.capacity
    replay.priorities[: replay.num_envs * replay.capacity] = 1.0


def training_parts(module, script_args, device: torch.device, num_actions: int = 6, **builder_args):
    """The script's own training parts (make_training: networks, optimizer, replay, loss sums, the accelerated update,
    and rainbow_pruned's pruner), with the replay filled. `builder_args` go to make_training (rainbow_pruned's
    prune_steps)."""
    module.configure_process(script_args)  # as the script's main() does
    parts = module.make_training(script_args, num_actions, device, **builder_args)
    fill_replay(parts.replay)
    return parts
