"""A DER network evaluated as the protocol evaluates it (noisy layers at their mean weights) and with its noise on,
with the greedy actions each one chose: tells a policy that only loops without its noise from one that cannot play.

    python benchmark/evaluation_noise.py runs/der100k_baseline/RoadRunner-v5__pooling=flatten_scale=1_no_cuda__seed1/*/

Atari 100k evaluates with the noise off and epsilon 0.001 (as Dopamine does): a nearly deterministic policy that
repeats one losing action scores 0 in every game, while the same network with its noise may play well.
Takes a run folder holding checkpoint.pt (the latest checkpoint) or model.pt (`--save-model`), plays `--episodes`
whole games each way through the script's own evaluate() and make_env, and prints, for each, the returns and how
often each action was the greedy one; `--out` also writes them as JSON.
"""

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.scripts import load_script  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run folder of der_atari100k_gap.py with checkpoint.pt or model.pt"""
    episodes: int = 8
    """games played each way, one per parallel env"""
    seed: int = 123
    """seed of the evaluation envs and of the noise (the same games both ways)"""
    out: Optional[str] = None
    """a JSON file for the results"""


class GreedyActionCounter(torch.nn.Module):
    """Wraps a QNetwork for evaluate(): counts the greedy action of every step and, with `with_noise`, draws fresh
    noise for each row, as training's action selection does."""

    def __init__(self, net: torch.nn.Module, with_noise: bool):
        super().__init__()
        self.net = net
        self.with_noise = with_noise
        self.num_actions = net.num_actions
        self.counts = Counter()

    def q_values(self, obs: torch.Tensor, noise: Optional[dict] = None) -> torch.Tensor:
        if self.with_noise:
            noise = self.net.sample_noise(obs.shape[0])
        q = self.net.q_values(obs, noise)
        self.counts.update(q.argmax(1).tolist())
        return q


def load_network(der, run_dir: str):
    """The run's script args and its online network, from model.pt if present, else from checkpoint.pt."""
    model_path = os.path.join(run_dir, "model.pt")
    if os.path.isfile(model_path):
        saved = torch.load(model_path, map_location="cpu", weights_only=False)
        weights = saved["model"]
    else:
        checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
        if not os.path.isfile(checkpoint_path):
            raise SystemExit(f"error: {run_dir} holds neither model.pt nor checkpoint.pt")
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)  # the replay stays on disk
        weights = saved["net"]
    args = der.Args(**{**saved["args"], "cuda": False, "resume": None})
    envs = der.make_env(args, num_envs=1)
    net = der.QNetwork(envs.num_actions, args)
    envs.close()
    net.load_state_dict(weights)
    return args, net


def main(args: Args) -> dict:
    der = load_script("der_atari100k_gap")
    script_args, net = load_network(der, args.run_dir)
    script_args = replace(script_args, eval_episodes=args.episodes)
    results = {}
    for mode, with_noise in [("noise off (the protocol)", False), ("noise on", True)]:
        counter = GreedyActionCounter(net, with_noise)
        torch.manual_seed(args.seed)
        returns = der.evaluate(counter, script_args, torch.device("cpu"), seed=args.seed)
        counts = {str(action): counter.counts[action] for action in sorted(counter.counts)}
        results[mode] = dict(returns=returns, mean_return=sum(returns) / len(returns), greedy_actions=counts)
        print(f"{mode}: mean return {results[mode]['mean_return']:.1f}, returns {returns}")
        print(f"  greedy actions (action: steps): {counts}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(run_dir=args.run_dir, episodes=args.episodes, seed=args.seed, **results), f, indent=2)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
