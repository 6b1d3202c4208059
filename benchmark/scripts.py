"""Load the single-file scripts of cleanrl_gap/ as modules (they are scripts, not a package), and build their
training parts the way their main() does, for the benchmarks and tests."""

import importlib.util
import os
import sys
from types import SimpleNamespace

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


def filled_replay(module, script_args, device: torch.device):
    """A full replay of random frames, every transition sampleable at priority 1 (sampling cost depends on sizes,
    not on contents)."""
    replay = module.DeviceReplay(
        script_args.buffer_size,
        script_args.num_envs,
        script_args.frame_size,
        script_args.frame_stack,
        script_args.n_step,
        script_args.gamma,
        device,
    )
    replay.frames.random_(0, 256)
    replay.episode_end.zero_()
    replay.adds = replay.capacity
    replay.priorities[: replay.num_envs * replay.capacity] = 1.0
    return replay


def training_parts(module, script_args, device: torch.device, num_actions: int = 6) -> SimpleNamespace:
    """Online and target networks, optimizer, a filled replay, the loss sums and the (accelerated) update."""
    torch.backends.cudnn.deterministic = script_args.torch_deterministic  # as the script's main() sets them
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = script_args.tf32
    net = module.QNetwork(num_actions, script_args).to(device)
    target_net = module.QNetwork(num_actions, script_args).to(device)
    target_net.load_state_dict(net.state_dict())
    optimizer = module.make_optimizer(net, script_args)
    replay = filled_replay(module, script_args, device)
    stats = torch.zeros(2, device=device)
    update = module.accelerated(module.make_update(net, target_net, optimizer, replay, script_args, stats), script_args)
    return SimpleNamespace(net=net, target_net=target_net, optimizer=optimizer, replay=replay, stats=stats, update=update)
