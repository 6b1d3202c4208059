"""Learning test: Rainbow (C51, PER, 3-step) with the Impala encoder and GAP learns Catch in a few seconds on a CPU."""

import pytest

from benchmark.scripts import ALL_SCRIPTS, load_script


def learn_catch(name, seed, tmp_path) -> dict:
    rainbow = load_script(name)
    args = rainbow.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=16,
        seed=seed,
        cuda=False,
        output_dir=str(tmp_path / str(seed)),
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
    return rainbow.main(args)


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_rainbow_learns_catch(name, tmp_path):
    """2,000 agent steps (1,800 updates) of Rainbow must clearly beat a random policy on Catch, with seed 1 or, where
    seed 1 falls short, seed 2.

    A random policy scores about -0.5 a ball and a perfect one +1. With the flagship, seeds 1-8 all reach 1.0 over
    50 evaluation episodes and 0.86-0.97 in training over the last 500 steps. A run of this size can still fall short,
    and which seed does depends on the CPU's float kernels: on one 2-core AMD EPYC CPU the Procgen script's seed 1
    ended with a greedy evaluation of -0.48 (after 0.76) while training returned 0.97, and SoftMoE-1's seed 2 trained
    to 0.01. So a run passes with 0.8 in evaluation (at most 10% of the balls missed) and 0.5 in training, and one of
    two seeds must pass: far above random, and an agent that does not learn cannot. On one torch thread
    (tests/conftest.py) a run takes under a minute.
    """
    results = []
    for seed in (1, 2):
        summary = learn_catch(name, seed, tmp_path)
        training_returns = [it["mean_return"] for it in summary["returns_by_iteration"]]
        results.append((seed, summary["eval_return"], training_returns))
        if summary["eval_return"] >= 0.8 and training_returns[-1] >= 0.5:
            return
    pytest.fail(f"no seed learned Catch (seed, evaluation, training returns by iteration): {results}")
