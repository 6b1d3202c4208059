"""DER on Atari 100k: what differs from the flagship, against independent references (noisy layers, dueling heads,
double-DQN targets, life-loss terminals, no-op starts, parallel evaluation, the human-normalised score). The
flagship's end-to-end, learning, determinism, bad-input and checkpoint tests run for this script through SCRIPTS."""

import csv
import glob
import os

import numpy as np
import pytest
import torch

from benchmark.scripts import ROOT, load_script
from tests.test_c51 import brute_force_projection

der = load_script("der_atari100k_gap")
TINY = dict(frame_size=24, cuda=False, progress_seconds=1e9)


def test_defaults_are_dopamine_der():
    args = der.Args()
    assert (args.n_step, args.learning_rate, args.adam_eps, args.batch_size, args.train_frequency) == (10, 1e-4, 1.5e-4, 32, 1)
    assert (args.target_network_frequency, args.learning_starts, args.gamma, args.num_atoms, args.v_max) == (2000, 1600, 0.99, 51, 10.0)
    assert args.noisy and args.dueling and args.double_dqn and args.terminal_on_life_loss
    assert (args.total_timesteps, args.iteration_steps, args.eval_episodes, args.eval_epsilon) == (100_000, 10_000, 100, 0.001)
    assert (args.sticky_action_prob, args.noop_max, args.max_episode_frames // args.frame_skip) == (0.0, 30, 27_000)


def test_noisy_layer_uses_factorised_noise_with_dopamine_initialisation():
    fan_in, fan_out = 7, 5
    torch.manual_seed(0)
    layer = der.NoisyLinear(fan_in, fan_out)
    assert torch.all(layer.weight_sigma == 0.1 / np.sqrt(fan_in)) and torch.all(layer.bias_sigma == 0.1 / np.sqrt(fan_in))
    assert layer.weight.abs().max() <= fan_in**-0.5 and layer.bias.abs().max() <= fan_in**-0.5
    x = torch.randn(3, fan_in)

    torch.manual_seed(1)
    noisy_output = layer(x)
    torch.manual_seed(1)  # Fortunato et al. (2018), eq. 10-11: one noise vector per input and per output unit
    f = lambda e: torch.sign(e) * torch.sqrt(torch.abs(e))
    eps_in, eps_out = f(torch.randn(fan_in)), f(torch.randn(fan_out))
    weight = layer.weight + layer.weight_sigma * eps_out[:, None] * eps_in[None, :]
    bias = layer.bias + layer.bias_sigma * eps_out
    torch.testing.assert_close(noisy_output, x @ weight.T + bias)
    assert not torch.allclose(layer(x), noisy_output)  # new noise every call

    layer.eval()  # evaluation: the mean weights, no noise
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def tiny_net(seed):
    torch.manual_seed(seed)
    return der.QNetwork(4, der.Args(**TINY)).eval()


def test_dueling_heads_combine_value_and_mean_centred_advantages():
    net, x = tiny_net(0), torch.randint(0, 256, (6, 4, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        hidden = net.psi(net.bottleneck_features(x))
        advantages = net.head(hidden).view(6, 4, 51)
        value = net.value_head(hidden)
        expected = torch.stack([torch.stack([value[i] + advantages[i, a] - sum(advantages[i, b] for b in range(4)) / 4
                                             for a in range(4)]) for i in range(6)])
        torch.testing.assert_close(net(x), expected)


def test_double_dqn_target_picks_the_online_argmax_and_evaluates_it_with_the_target_network():
    net, target_net = tiny_net(0), tiny_net(1)
    torch.manual_seed(2)
    batch = dict(obs=torch.randint(0, 256, (16, 4, 24, 24), dtype=torch.uint8), actions=torch.randint(0, 4, (16,)),
                 returns=torch.randn(16), discounts=torch.full((16,), 0.99**10),
                 next_obs=torch.randint(0, 256, (16, 4, 24, 24), dtype=torch.uint8))
    with torch.no_grad():
        losses, _ = der.c51_losses(net, target_net, batch, double_dqn=True)
        online_next, target_next = net(batch["next_obs"]).softmax(-1), target_net(batch["next_obs"]).softmax(-1)
        support = net.support.double().numpy()
        logits = net(batch["obs"])
    online_choice = (online_next * net.support).sum(-1).argmax(1)
    assert (online_choice != (target_next * net.support).sum(-1).argmax(1)).any()  # the two rules differ here
    for i in range(16):
        a = int(online_choice[i])
        target = brute_force_projection(float(batch["returns"][i]) + float(batch["discounts"][i]) * support,
                                         target_next[i, a].double().numpy(), support)
        expected = -(torch.tensor(target) * logits[i, batch["actions"][i]].double().log_softmax(-1)).sum()
        assert abs(float(losses[i]) - float(expected)) < 1e-4


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_breakout_loses_four_lives_before_its_game_ends(backend):
    """Breakout has 5 lives: a random game flags 4 lost lives (the game goes on) and then terminates."""
    envs = der.make_env(der.Args(env_id="Breakout", env_backend=backend, **TINY), num_envs=1, seed=3)
    envs.reset()
    rng, lives_lost = np.random.default_rng(0), 0
    for _ in range(5000):
        _, _, terminated, truncated, life_lost = envs.step(rng.integers(0, envs.num_actions, 1))
        assert not (life_lost[0] and terminated[0])
        lives_lost += int(life_lost[0])
        if terminated[0] or truncated[0]:
            break
    envs.close()
    assert terminated[0] and lives_lost == 4


def test_noop_starts_are_uniform_from_0_to_noop_max():
    envs = der.make_env(der.Args(env_id="Pong", env_backend="gymnasium", **TINY), num_envs=1, seed=5)
    ale = envs.envs[0].unwrapped.ale
    counts = np.zeros(32, dtype=int)
    for _ in range(620):
        envs._reset_one(0)
        counts[ale.getEpisodeFrameNumber()] += 1  # frames played since the game's reset: the no-ops
    envs.close()
    assert counts[31] == 0 and counts[:31].min() >= 5  # each of 0..30 about 20 times, never 31
    assert abs(counts[:31] @ np.arange(31) / 620 - 15) < 1.5


def run_catch_lives(tmp_path, terminal_on_life_loss):
    args = der.Args(env_backend="gymnasium", env_id="tests.catch_env:CatchLives-v0", total_timesteps=400,
                    learning_starts=300, train_frequency=4, buffer_size=1000, iteration_steps=200, eval_episodes=0,
                    checkpoint_every=400, output_dir=str(tmp_path / str(terminal_on_life_loss)),
                    terminal_on_life_loss=terminal_on_life_loss, **TINY)
    summary = der.main(args)
    replay = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)["replay"]
    return summary, replay


def test_a_lost_life_is_terminal_for_learning_but_the_game_goes_on(tmp_path):
    summary, replay = run_catch_lives(tmp_path, terminal_on_life_loss=True)
    misses, terminals = int((replay["rewards"] == -1).sum()), int(replay["terminal"].sum())
    games = sum(it["episodes"] for it in summary["returns_by_iteration"])
    assert terminals == misses > games > 0  # every miss ends a life; three make a game
    assert all(-3 <= it["mean_return"] for it in summary["returns_by_iteration"])  # returns are whole games

    summary, replay = run_catch_lives(tmp_path, terminal_on_life_loss=False)
    games = sum(it["episodes"] for it in summary["returns_by_iteration"])
    assert int(replay["terminal"].sum()) == games < int((replay["rewards"] == -1).sum())


def test_evaluation_plays_one_whole_game_in_each_of_n_parallel_envs():
    args = der.Args(env_backend="gymnasium", env_id="tests.catch_env:CatchLives-v0", eval_episodes=12, **TINY)
    returns = der.evaluate(tiny_net(0), args, torch.device("cpu"), seed=0)
    assert len(returns) == 12
    assert all(r >= -3 for r in returns)  # a game ends at its third miss
    assert min(returns) <= -2  # a life lost did not end the episode (one life can cost at most -1)


def test_human_normalised_score_and_the_26_games():
    with open(os.path.join(ROOT, "benchmark", "reference", "atari_human_random.csv")) as f:
        reference = {row["game"]: (float(row["random"]), float(row["human"])) for row in csv.DictReader(f)}
    assert len(der.ATARI_100K_SCORES) == 26
    for game, (random_score, human_score) in der.ATARI_100K_SCORES.items():
        assert reference[game] == (random_score, human_score)
        assert der.human_normalized_score(game, random_score) == 0.0
        assert der.human_normalized_score(f"{game}-v5", human_score) == pytest.approx(1.0)
    assert der.human_normalized_score("ALE/Pong-v5", -3.05) == pytest.approx(0.5)
    assert der.human_normalized_score("tests.catch_env:Catch-v0", 1.0) is None
    assert der.human_normalized_score("Pong", None) is None


def test_short_run_reports_an_evaluation_after_every_iteration(tmp_path):
    args = der.Args(env_id="Pong", total_timesteps=120, learning_starts=60, buffer_size=1000, iteration_steps=50,
                    eval_episodes=2, max_episode_frames=400, output_dir=str(tmp_path), **TINY)  # 100-step episodes
    summary = der.main(args)
    assert [it["step"] for it in summary["eval_by_iteration"]] == [50, 100, 120]
    assert all(it["episodes"] == 2 for it in summary["eval_by_iteration"])
    assert summary["eval_return"] == summary["eval_by_iteration"][-1]["mean_return"] == np.mean(summary["eval_returns"])
    assert summary["human_normalized_score"] == pytest.approx((summary["eval_return"] + 20.7) / 35.3)
    assert summary["updates"] == 120 - 60 and glob.glob(os.path.join(summary["run_dir"], "events.*"))
