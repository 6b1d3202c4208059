"""benchmark/random_play.py: uniform random play through a script's own env wrapper, one whole game per env."""

import json

import numpy as np
import pytest

from benchmark import random_play
from benchmark.scripts import load_script


@pytest.mark.parametrize("name", ["rainbow_impala_gap", "der_atari100k_gap"])  # 4 and 5 outputs of env.step
def test_random_play_on_catch_scores_as_a_random_policy(name):
    """Catch: -1 a miss, +1 a catch; a uniformly random paddle catches about a quarter of the balls."""
    module = load_script(name)
    args = module.Args(env_backend="gymnasium", env_id="toy_envs.catch:Catch-v0", frame_size=16, cuda=False)
    returns = random_play.random_returns(module, args, episodes=400, seed=3)
    assert returns.shape == (400,)
    assert set(np.unique(returns)) <= {-1.0, 1.0}  # exactly one game each: one reward of +-1, nothing after it
    catches = float(np.mean(returns == 1.0))
    assert 0.15 < catches < 0.35, catches


def test_results_merge_into_the_json_file(tmp_path):
    out = tmp_path / "random_play.json"
    out.write_text(json.dumps({"Breakout": {"mean_return": 1.5}}))
    results = random_play.main(random_play.Args(games=["Pong"], episodes=2, out=str(out)))
    saved = json.loads(out.read_text())
    assert saved["Breakout"] == {"mean_return": 1.5}  # earlier games stay
    assert saved["Pong"]["episodes"] == 2 and saved["Pong"]["table_random"] == -20.7
    assert -21.0 <= saved["Pong"]["mean_return"] <= 21.0 and saved == results


def test_the_table_protocol_options_reach_the_env(tmp_path):
    """--frame-skip and --max-episode-frames reach the script's env: 600 frames are 10 s of Pong, too short to lose
    more than a few points (a full random game loses about 21), and the JSON records the protocol played."""
    out = tmp_path / "random_play.json"
    results = random_play.main(
        random_play.Args(games=["Pong"], episodes=2, frame_skip=6, max_episode_frames=600, out=str(out))
    )
    assert results["Pong"]["frame_skip"] == 6 and results["Pong"]["max_episode_frames"] == 600
    assert results["Pong"]["mean_return"] > -10.0
