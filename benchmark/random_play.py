"""Uniform random play through a script's own environment wrapper: the control beside the published random scores.

    python benchmark/random_play.py --games RoadRunner KungFuMaster --episodes 30 --out docs/results/random_play.json

Each game is played `--episodes` times in parallel envs made by the script's `make_env` (DER's by default: no sticky
actions, 0-29 no-op steps at reset, the 27k-step cap), one whole game per env, with actions drawn uniformly. The mean
return sits next to the random score of the human-normalisation table (benchmark/reference/atari_human_random.csv):
a wrapper that loses rewards, ends games early or maps actions wrongly shows up as a gap between the two.
Writes (and merges into) a JSON file: {game: {episodes, mean_return, std_return, table_random, seconds, ...}}.

    python benchmark/random_play.py --games Hero Amidar --frame-skip 6 --max-episode-frames 18000 \
        --out docs/results/random_play_table_protocol.json     # as the table's random agent played
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.metrics import game_name, reference_table  # noqa: E402
from benchmark.scripts import load_script  # noqa: E402


@dataclass
class Args:
    games: List[str] = field(default_factory=lambda: ["Pong"])
    """games by name (the script's env ids are formed as NAME-v5)"""
    script: str = "der_atari100k_gap"
    """the script whose make_env plays (its Args' environment defaults apply)"""
    episodes: int = 30
    """games played per game title, one per parallel env"""
    env_backend: str = "envpool"
    """envpool or gymnasium"""
    seed: int = 1
    """seed of the envs and the actions"""
    out: str = "benchmark/results/random_play.json"
    """JSON file the results are merged into"""
    frame_skip: Optional[int] = None
    """frames per action (default: the script's, 4); the table's random scores come from an agent that chose an
    action every sixth frame in games of at most 5 minutes (Mnih et al. 2015): `--frame-skip 6
    --max-episode-frames 18000`"""
    max_episode_frames: Optional[int] = None
    """the cap on a game's frames (default: the script's, 108,000 for DER)"""


def random_returns(module, script_args, episodes: int, seed: int) -> np.ndarray:
    """One whole game per env with uniform random actions; the games' returns."""
    envs = module.make_env(script_args, num_envs=episodes, seed=seed)
    envs.reset()
    rng = np.random.default_rng(seed)
    returns, playing = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while playing.any():
        outcome = envs.step(rng.integers(0, envs.num_actions, episodes))
        rewards, terminated, truncated = outcome[1], outcome[2], outcome[3]  # DER's envs add the lives lost
        returns += np.where(playing, rewards, 0.0)
        playing &= ~(terminated | truncated)
    envs.close()
    return returns


def main(args: Args) -> dict:
    module = load_script(args.script)
    table = reference_table()
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    for game in args.games:
        script_args = replace(module.Args(), env_id=f"{game}-v5", env_backend=args.env_backend, cuda=False)
        if args.frame_skip is not None:
            script_args = replace(script_args, frame_skip=args.frame_skip)
        if args.max_episode_frames is not None:
            script_args = replace(script_args, max_episode_frames=args.max_episode_frames)
        start = time.time()
        returns = random_returns(module, script_args, args.episodes, args.seed)
        table_random = table.get(game_name(script_args.env_id), (None, None))[0]
        results[game] = dict(
            episodes=args.episodes,
            mean_return=float(returns.mean()),
            std_return=float(returns.std()),
            table_random=table_random,
            seconds=round(time.time() - start, 1),
            script=args.script,
            env_backend=args.env_backend,
            frame_skip=script_args.frame_skip,
            max_episode_frames=script_args.max_episode_frames,
        )
        print(
            f"{game}: {returns.mean():.1f} +- {returns.std():.1f} over {args.episodes} games "
            f"(table random {table_random}) in {results[game]['seconds']} s",
            flush=True,
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
