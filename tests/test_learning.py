"""Learning test: Rainbow (C51, PER, 3-step) with the Impala encoder and GAP learns Catch in a few seconds on a CPU."""

import pytest

from benchmark.scripts import ALL_SCRIPTS, load_script


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_rainbow_learns_catch(name, tmp_path):
    """2,000 agent steps (1,800 updates) of Rainbow must clearly beat a random policy on Catch.

    A random policy scores about -0.5 a ball and a perfect one +1. With this seed the greedy policy scores 1.0
    over 50 evaluation episodes and about 0.9 in training over the last 500 steps (seeds 1-8 all reach 1.0 in
    evaluation and 0.86-0.97 in training). The thresholds (0.8 in evaluation, i.e. at most 10% of the balls
    missed, and 0.5 in training) leave a margin below that, yet lie far above random; an agent that does not
    learn cannot pass them. On one torch thread (tests/conftest.py) the run takes about a minute.
    """
    rainbow = load_script(name)
    args = rainbow.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=16,
        seed=1,
        cuda=False,
        output_dir=str(tmp_path),
        progress_seconds=1e9,
        total_timesteps=2000,
        iteration_steps=500,
        learning_starts=200,
        buffer_size=5000,
        learning_rate=1e-3,
        epsilon_decay_steps=1000,
        target_network_frequency=200,
        train_frequency=1,
        eval_episodes=50,
        # the sparse baselines' mask schedule, scaled from 50M steps to this run: masks tighten every 50 updates
        **({"mask_update_every": 50, "rigl_update_every": 250} if name == "rainbow_pruned" else {}),
    )
    summary = rainbow.main(args)

    training_returns = [it["mean_return"] for it in summary["returns_by_iteration"]]
    assert summary["eval_return"] >= 0.8, (summary["eval_return"], training_returns)
    assert training_returns[-1] >= 0.5, training_returns
