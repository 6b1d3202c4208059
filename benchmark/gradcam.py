"""Grad-CAM saliency maps of trained agents (Selvaraju et al. 2017), as in the paper's Figure 3: where the scaled
baseline looks against where GAP looks.

    python benchmark/gradcam.py RUN_DIR [RUN_DIR ...] --frames 6 --out gradcam.png

Each run folder holds model.pt (the script's `--save-model`) and summary.json, whose "script" names the script that
rebuilds the network from model.pt's args. The first run's agent plays its env (epsilon-greedy, `--epsilon 0`:
greedy) for `--warmup-steps`, then every `--every` steps a frame stack is kept, `--frames` in all; every run is
explained on those same stacks, one row a run, so two folders (flatten and GAP) compare side by side.

Grad-CAM of Q(s, a*), a* = argmax_a Q(s, a) the greedy action, Q the mean of the C51 distribution: with A^k the
k-th channel of the explained activations (`--layer last-conv`: the output of phi's last nn.Conv2d; `phi`: phi's
output, after the last residual sum and ReLU), alpha_k = mean_ij dQ(s, a*)/dA^k_ij and the map is
ReLU(sum_k alpha_k A^k), bilinearly upsampled to the frame and divided by its maximum (an all-zero map stays zero).
It is drawn over the newest frame of the stack.
"""

import json
import os
import sys
import textwrap
from dataclasses import dataclass, fields
from typing import List, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.metrics import method_label  # noqa: E402
from benchmark.scripts import load_script  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[List[str]]
    """run folders, each with model.pt (trained with --save-model) and summary.json; several are drawn one row each,
    on the same frames (they must share the env, frame size and stack)"""
    frames: int = 6
    """frame stacks explained (columns of the grid)"""
    out: str = "gradcam.png"
    """the PNG written"""
    warmup_steps: int = 100
    """agent steps played before the first frame kept"""
    every: int = 20
    """agent steps between two frames kept"""
    epsilon: float = 0.0
    """exploration of the playing agent (0: greedy)"""
    seed: int = 0
    """seed of the env and of the exploration"""
    layer: Literal["last-conv", "phi"] = "last-conv"
    """the activations explained: the output of phi's last nn.Conv2d, or phi's output"""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_run(run_dir: str):
    """(the script's module, its Args, the network's state_dict, summary.json) of a run folder."""
    summary_path, model_path = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "model.pt")
    if not os.path.isfile(summary_path) or not os.path.isfile(model_path):
        fail(f"{run_dir} needs summary.json and model.pt (train with --save-model)")
    with open(summary_path) as f:
        summary = json.load(f)
    module = load_script(os.path.splitext(summary["script"])[0])
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    known = {field.name for field in fields(module.Args)}
    return module, module.Args(**{k: v for k, v in saved["args"].items() if k in known}), saved["model"], summary


def explained_layer(net: nn.Module, layer: str) -> nn.Module:
    if layer == "phi":
        return net.phi
    return [module for module in net.phi.modules() if isinstance(module, nn.Conv2d)][-1]


def grad_cam(net: nn.Module, obs: torch.Tensor, layer: str = "last-conv"):
    """(maps (batch, H, W) in [0, 1], greedy actions) for uint8 stacks `obs` (batch, stack, [3,] H, W)."""
    captured = []
    hook = explained_layer(net, layer).register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        q = net.q_values(obs)
    finally:
        hook.remove()
    activations = captured[-1]
    actions = q.argmax(1)
    (gradients,) = torch.autograd.grad(q.gather(1, actions.unsqueeze(1)).sum(), activations)  # samples are independent
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=obs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp(min=1e-12), cam).detach(), actions


def play(module, env, script_args, net: nn.Module, args: Args) -> torch.Tensor:
    """The frame stacks kept while the agent plays: (frames, stack, H, W) uint8, or (frames, stack, 3, H, W) for
    colour frames (Procgen)."""
    torch.manual_seed(args.seed)
    first = torch.as_tensor(env.reset())
    obs = torch.zeros(1, script_args.frame_stack, *first.shape[1:], dtype=torch.uint8)
    obs[:, -1] = first
    kept = []
    for step in range(args.warmup_steps + args.every * (args.frames - 1) + 1):
        if step >= args.warmup_steps and (step - args.warmup_steps) % args.every == 0:
            kept.append(obs[0].clone())
        actions = module.select_actions(net, obs, args.epsilon, with_noise=False)  # as evaluation plays
        frames, _, terminated, truncated = env.step(actions.numpy())[:4]  # DER's envs add the lives lost
        obs = module.advance_stack(obs, torch.as_tensor(frames), torch.as_tensor(terminated | truncated))
    return torch.stack(kept)


def draw(stacks: torch.Tensor, rows: List[tuple], layer: str, out: str) -> str:
    """A grid: one row per (label, maps, actions), one column per stack; each map over the stack's newest frame."""
    fig, axes = plt.subplots(len(rows), len(stacks), figsize=(2.2 * len(stacks), 2.4 * len(rows) + 0.4), squeeze=False)
    for r, (label, maps, actions) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            newest = stacks[c, -1]
            if newest.dim() == 3:  # colour: (3, H, W)
                ax.imshow(newest.permute(1, 2, 0).numpy())
            else:
                ax.imshow(newest.numpy(), cmap="gray", vmin=0, vmax=255)
            ax.imshow(maps[c].numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"a* = {int(actions[c])}", fontsize=8)
        axes[r, 0].set_ylabel(textwrap.fill(label, 32), fontsize=7)
    fig.suptitle(f"Grad-CAM of Q(s, a*) at {'the last conv layer of phi' if layer == 'last-conv' else 'the output of phi'}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(args: Args) -> str:
    if args.frames < 1 or args.every < 1 or args.warmup_steps < 0:
        fail("--frames and --every must be positive, --warmup-steps not negative")
    runs = [load_run(run_dir) for run_dir in args.run_dirs]
    first = runs[0][1]
    for run_dir, (_, script_args, _, _) in zip(args.run_dirs, runs):
        theirs = (script_args.env_id, script_args.frame_size, script_args.frame_stack)
        if theirs != (first.env_id, first.frame_size, first.frame_stack):
            fail(
                f"{run_dir} has env, frame size and stack {theirs}, the first run "
                f"{(first.env_id, first.frame_size, first.frame_stack)}: they must be explained on the same frames"
            )
    env = runs[0][0].make_env(first, num_envs=1, seed=args.seed)
    nets = []
    for module, script_args, state_dict, _ in runs:
        nets.append(module.QNetwork(env.num_actions, script_args))
        nets[-1].load_state_dict(state_dict)
        nets[-1].eval()  # the maps are taken without noise: the networks' forward uses the mean weights
    stacks = play(runs[0][0], env, first, nets[0], args)
    env.close()
    rows = []
    for net, (_, _, _, summary) in zip(nets, runs):
        maps, actions = grad_cam(net, stacks, args.layer)
        rows.append((method_label(summary, []), maps, actions))
    path = draw(stacks, rows, args.layer, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))
