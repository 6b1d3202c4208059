"""DER on Atari 100k: what differs from the flagship, against independent references (the default network, noisy
layers, dueling heads, double-DQN targets, life-loss terminals and stack restarts, no-op starts, parallel evaluation,
the human-normalised score). The flagship's end-to-end, learning, determinism, bad-input and checkpoint tests run for
this script through SCRIPTS."""

import csv
import glob
import os
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

from benchmark.scripts import ROOT, load_script
from tests.helpers import brute_force_projection

der = load_script("der_atari100k_gap")
TINY = dict(frame_size=24, cuda=False, progress_seconds=1e9)


def test_defaults_are_dopamine_der():
    args = der.Args()
    assert (args.n_step, args.learning_rate, args.adam_eps, args.batch_size, args.train_frequency) == (10, 1e-4, 1.5e-4, 32, 1)
    assert (args.target_network_frequency, args.learning_starts, args.gamma, args.num_atoms, args.v_max) == (
        2000,
        1600,
        0.99,
        51,
        10.0,
    )
    assert args.noisy and args.dueling and args.double_dqn and args.terminal_on_life_loss
    assert (args.total_timesteps, args.iteration_steps, args.eval_episodes, args.eval_epsilon) == (100_000, 10_000, 100, 0.001)
    assert (args.sticky_action_prob, args.noop_max, args.max_episode_frames // args.frame_skip) == (0.0, 30, 27_000)
    assert (args.encoder, args.pooling) == ("nature", "gap")  # labs/moes DER.gin's encoder_type = 'CNN'


def test_default_encoder_with_flatten_is_dopamine_der_network():
    """labs/moes RainbowCNNet (8x8/4, 4x4/2, 3x3/1 convs of 32, 64, 64 channels, 'SAME' padding), flattened into a
    noisy 512-unit layer, with dueling noisy heads: `--pooling flatten --scale 1` is Dopamine's DER network."""
    net = der.QNetwork(6, der.Args(pooling="flatten", scale=1))
    convs = [m for m in net.phi.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 4, 8, 8), (64, 32, 4, 4), (64, 64, 3, 3)]
    assert [c.stride for c in convs] == [(4, 4), (2, 2), (1, 1)]
    # 'SAME' padding keeps ceil(size / stride): 84 -> 21 -> 11 -> 11
    assert net.feature_shape == (64, 11, 11) and tuple(net.bottleneck.weight.shape) == (512, 11 * 11 * 64)
    assert all(type(m).__name__ == "NoisyLinear" for m in (net.bottleneck, net.head, net.value_head))
    assert tuple(der.QNetwork(6, der.Args()).bottleneck.weight.shape) == (512, 64)  # GAP: one input per channel


def test_noisy_layer_uses_factorised_noise_with_dopamine_initialisation():
    fan_in, fan_out, rows = 7, 5, 3
    torch.manual_seed(0)
    layer = der.NoisyLinear(fan_in, fan_out)
    assert torch.all(layer.weight_sigma == 0.1 / np.sqrt(fan_in)) and torch.all(layer.bias_sigma == 0.1 / np.sqrt(fan_in))
    assert layer.weight.abs().max() <= fan_in**-0.5 and layer.bias.abs().max() <= fan_in**-0.5
    x = torch.randn(rows, fan_in)

    def f(e):
        return torch.sign(e) * torch.sqrt(torch.abs(e))

    torch.manual_seed(1)
    noisy_output = layer(x, {layer.name: layer.sample_noise(rows)})
    torch.manual_seed(1)  # Fortunato et al. (2018), eq. 10-11: one noise vector per input and per output unit, per row
    eps_in, eps_out = f(torch.randn(rows, fan_in)), f(torch.randn(rows, fan_out))
    for r in range(rows):
        weight = layer.weight + layer.weight_sigma * torch.outer(eps_out[r], eps_in[r])
        bias = layer.bias + layer.bias_sigma * eps_out[r]
        torch.testing.assert_close(noisy_output[r], weight @ x[r] + bias)

    torch.manual_seed(2)
    shared_output = layer(x, {layer.name: layer.sample_noise(1)})
    torch.manual_seed(2)  # one row of noise: the whole batch sees the same perturbed weights
    eps_in, eps_out = f(torch.randn(fan_in)), f(torch.randn(fan_out))
    weight = layer.weight + layer.weight_sigma * torch.outer(eps_out, eps_in)
    torch.testing.assert_close(shared_output, x @ weight.T + layer.bias + layer.bias_sigma * eps_out)

    assert not torch.allclose(layer(x, {layer.name: layer.sample_noise(rows)}), noisy_output)  # new noise every draw
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # no noise (evaluation): the mean weights


def tiny_net(seed):
    torch.manual_seed(seed)
    return der.QNetwork(4, der.Args(**TINY))


@pytest.mark.parametrize("noisy", [False, True])
def test_dueling_heads_combine_value_and_mean_centred_advantages(noisy):
    net, x = tiny_net(0), torch.randint(0, 256, (6, 4, 24, 24), dtype=torch.uint8)
    noise = net.sample_noise(6) if noisy else None  # per-sample noise in every noisy layer, or the mean weights
    with torch.no_grad():
        hidden = net.psi(net.bottleneck_features(x), noise)
        advantages = net.head(hidden, noise).view(6, 4, 51)
        value = net.value_head(hidden, noise)
        expected = torch.stack(
            [
                torch.stack([value[i] + advantages[i, a] - sum(advantages[i, b] for b in range(4)) / 4 for a in range(4)])
                for i in range(6)
            ]
        )
        torch.testing.assert_close(net(x, noise), expected)


def test_double_dqn_target_picks_the_online_argmax_and_evaluates_it_with_the_target_network():
    net, target_net = tiny_net(0), tiny_net(2)  # two networks whose greedy actions differ
    torch.manual_seed(2)
    batch = dict(
        obs=torch.randint(0, 256, (16, 4, 24, 24), dtype=torch.uint8),
        actions=torch.randint(0, 4, (16,)),
        returns=torch.randn(16),
        discounts=torch.full((16,), 0.99**10),
        next_obs=torch.randint(0, 256, (16, 4, 24, 24), dtype=torch.uint8),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        losses, _ = der.c51_losses(net, target_net, batch, double_dqn=True)
    torch.manual_seed(3)  # the same draws, in c51_losses's order: per-sample noise for the loss, one for the targets
    online_noise, target_noise = net.sample_noise(16), net.sample_noise(1)
    with torch.no_grad():
        online_next = net(batch["next_obs"], target_noise).softmax(-1)
        target_next = target_net(batch["next_obs"], target_noise).softmax(-1)
        support = net.support.double().numpy()
        logits = net(batch["obs"], online_noise)
    online_choice = (online_next * net.support).sum(-1).argmax(1)
    assert (online_choice != (target_next * net.support).sum(-1).argmax(1)).any()  # the two rules differ here
    for i in range(16):
        a = int(online_choice[i])
        target = brute_force_projection(
            float(batch["returns"][i]) + float(batch["discounts"][i]) * support, target_next[i, a].double().numpy(), support
        )
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


def test_gymnasium_noop_starts_are_0_to_29_agent_steps():
    """Dopamine's runner: n ~ uniform{0, ..., max_noops - 1} agent steps of action 0, each frame_skip (4) frames."""
    envs = der.make_env(der.Args(env_id="Pong", env_backend="gymnasium", **TINY), num_envs=1, seed=5)
    ale = envs.envs[0].unwrapped.ale
    counts = np.zeros(31, dtype=int)
    for _ in range(300):
        envs._reset_one(0)
        frames = ale.getEpisodeFrameNumber()  # frames played since the game's reset: the no-ops
        assert frames % 4 == 0
        counts[frames // 4] += 1
    envs.close()
    assert counts[30] == 0 and counts[:30].min() >= 1  # each of 0..29 about 10 times, never 30
    assert abs(counts @ np.arange(31) / 300 - 14.5) < 1.5


def test_envpool_noop_starts_are_0_to_29_agent_steps():
    """envpool's own step counter after a reset: the no-op steps taken (its one no-op frame at reset is no step)."""
    envs = der.make_env(der.Args(env_id="Pong", env_backend="envpool", **TINY), num_envs=1, seed=5)
    counts = np.zeros(31, dtype=int)
    for _ in range(300):
        envs.reset()
        _, _, _, _, info = envs.envs.step(np.zeros(1, dtype=np.int32))  # one more step, to read the counter
        counts[int(info["elapsed_step"][0]) - 1] += 1
    envs.close()
    assert counts[30] == 0 and counts[:30].min() >= 1
    assert abs(counts @ np.arange(31) / 300 - 14.5) < 1.5


def run_catch_lives(tmp_path, terminal_on_life_loss):
    args = der.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:CatchLives-v0",
        total_timesteps=400,
        learning_starts=300,
        train_frequency=4,
        buffer_size=1000,
        iteration_steps=200,
        eval_episodes=0,
        checkpoint_every=400,
        output_dir=str(tmp_path / str(terminal_on_life_loss)),
        terminal_on_life_loss=terminal_on_life_loss,
        **TINY,
    )
    summary = der.main(args)
    replay = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)["replay"]
    return summary, replay


def test_a_lost_life_is_terminal_for_learning_but_the_game_goes_on(tmp_path):
    summary, replay = run_catch_lives(tmp_path, terminal_on_life_loss=True)
    misses, terminals = int((replay["rewards"] == -1).sum()), int(replay["terminal"].sum())
    games = sum(it["episodes"] for it in summary["returns_by_iteration"])
    assert terminals == misses > games > 0  # every miss ends a life; three make a game
    assert games == misses // 3  # episodes are whole games: each ends at its third miss (per-life ones: games == misses)

    summary, replay = run_catch_lives(tmp_path, terminal_on_life_loss=False)
    games = sum(it["episodes"] for it in summary["returns_by_iteration"])
    assert int(replay["terminal"].sum()) == games < int((replay["rewards"] == -1).sum())


def test_evaluation_plays_one_whole_game_in_each_of_n_parallel_envs():
    args = der.Args(env_backend="gymnasium", env_id="toy_envs.catch:CatchLives-v0", eval_episodes=12, **TINY)
    returns = der.evaluate(tiny_net(0), args, torch.device("cpu"), seed=0)
    assert len(returns) == 12
    assert all(r >= -3 for r in returns)  # a game ends at its third miss
    assert min(returns) <= -2  # a life lost did not end the episode (one life can cost at most -1)


class StillPaddle(torch.nn.Module):
    """Stands in for the network in evaluate(): records every batch of frame stacks it is shown and always picks
    action 1 (Catch's paddle stays)."""

    num_actions = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def q_values(self, obs, noise=None):
        self.seen.append(obs.clone())
        return torch.tensor([0.0, 1.0, 0.0]).repeat(obs.shape[0], 1)


def reference_game(seed, terminal_on_life_loss):
    """One CatchLives game with the paddle still, played directly: the frame stack before each step (zeros where it
    has no frame yet; restarted by a lost life with terminal_on_life_loss, as Dopamine's reset_one) and the return."""
    env = gym.make("toy_envs.catch:CatchLives-v0")
    obs, info = env.reset(seed=seed)
    history, stacks, game_return, lives = [der.to_gray_frame(obs, 24)], [], 0.0, info["lives"]
    while True:
        stack = np.zeros((4, 24, 24), dtype=np.uint8)
        recent = history[-4:]
        stack[4 - len(recent) :] = np.stack(recent)
        stacks.append(stack)
        obs, reward, terminated, truncated, info = env.step(1)
        game_return += reward
        if terminated or truncated:
            return stacks, game_return
        if terminal_on_life_loss and info["lives"] < lives:
            history = []
        history.append(der.to_gray_frame(obs, 24))
        lives = info["lives"]


@pytest.mark.parametrize("terminal_on_life_loss", [True, False])
def test_evaluation_restarts_the_stack_after_a_lost_life_while_the_game_goes_on(terminal_on_life_loss):
    """Each env's frame stacks and return against its game played directly; only the envs whose game goes on are
    shown to the network (the batch at step t holds the games longer than t, in env order)."""
    envs = 6
    args = der.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:CatchLives-v0",
        eval_episodes=envs,
        eval_epsilon=0.0,
        terminal_on_life_loss=terminal_on_life_loss,
        **TINY,
    )
    net = StillPaddle()
    returns = der.evaluate(net, args, torch.device("cpu"), seed=7)
    games = [reference_game(7 + i, terminal_on_life_loss) for i in range(envs)]  # env i is reset with seed 7 + i
    lengths = [len(stacks) for stacks, _ in games]
    assert len(set(lengths)) > 1  # games end at different steps (a caught ball makes a game longer)
    assert [len(batch) for batch in net.seen] == [sum(n > t for n in lengths) for t in range(max(lengths))]
    for i, (stacks, game_return) in enumerate(games):
        restarts = [t for t in range(1, len(stacks)) if not stacks[t][:-1].any()]  # zeros but the newest frame
        assert len(restarts) == (2 if terminal_on_life_loss else 0)  # three lives: two lost before the game ends
        for t, stack in enumerate(stacks):
            row = sum(lengths[j] > t for j in range(i))  # the envs before i still playing at step t
            assert torch.equal(net.seen[t][row], torch.from_numpy(stack)), (i, t)
        assert returns[i] == game_return  # the whole game's return, the lost lives included


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_stepping_some_envs_gives_what_stepping_all_gives_them(backend):
    """Evaluation steps only the envs still playing: envs 3 and 1 stepped alone follow the same frames, rewards and
    lives as when every env steps (the envs are independent)."""
    args = der.Args(env_id="Breakout", env_backend=backend, **TINY)
    every, some = der.make_env(args, num_envs=4, seed=11), der.make_env(args, num_envs=4, seed=11)
    assert np.array_equal(every.reset(), some.reset())
    rng, chosen = np.random.default_rng(0), np.array([3, 1])
    for _ in range(60):
        actions = rng.integers(0, every.num_actions, 4)
        all_outputs = every.step(actions)
        some_outputs = some.step(actions[chosen], chosen)
        for full, part in zip(all_outputs, some_outputs):
            assert np.array_equal(full[chosen], part)
    every.close()
    some.close()


def test_human_normalised_score_and_the_26_games():
    with open(os.path.join(ROOT, "benchmark", "reference", "atari_human_random.csv")) as f:
        reference = {row["game"]: (float(row["random"]), float(row["human"])) for row in csv.DictReader(f)}
    assert len(der.ATARI_100K_SCORES) == 26
    for game, (random_score, human_score) in der.ATARI_100K_SCORES.items():
        assert reference[game] == (random_score, human_score)
        assert der.human_normalized_score(game, random_score) == 0.0
        assert der.human_normalized_score(f"{game}-v5", human_score) == pytest.approx(1.0)
    assert der.human_normalized_score("ALE/Pong-v5", -3.05) == pytest.approx(0.5)
    assert der.human_normalized_score("toy_envs.catch:Catch-v0", 1.0) is None
    assert der.human_normalized_score("Pong", None) is None


def test_short_run_reports_an_evaluation_after_every_iteration(tmp_path):
    args = der.Args(
        env_id="Pong",
        total_timesteps=120,
        learning_starts=60,
        buffer_size=1000,
        iteration_steps=50,
        eval_episodes=2,
        max_episode_frames=400,
        output_dir=str(tmp_path),
        **TINY,
    )  # 100-step episodes
    summary = der.main(args)
    assert [it["step"] for it in summary["eval_by_iteration"]] == [50, 100, 120]
    assert all(it["episodes"] == 2 for it in summary["eval_by_iteration"])
    assert summary["eval_return"] == summary["eval_by_iteration"][-1]["mean_return"] == np.mean(summary["eval_returns"])
    assert summary["human_normalized_score"] == pytest.approx((summary["eval_return"] + 20.7) / 35.3)
    assert summary["updates"] == 120 - 60 and glob.glob(os.path.join(summary["run_dir"], "events.*"))


def test_evaluation_prints_how_many_games_are_over(capsys):
    """With progress_seconds below zero a progress line follows every step: the games over after step t are those no
    longer than t, and the last line's mean is the evaluation's."""
    envs = 6
    args = der.Args(
        env_backend="gymnasium", env_id="toy_envs.catch:CatchLives-v0", eval_episodes=envs, eval_epsilon=0.0, **TINY
    )
    returns = der.evaluate(StillPaddle(), replace(args, progress_seconds=-1.0), torch.device("cpu"), seed=7)
    lengths = [len(reference_game(7 + i, terminal_on_life_loss=True)[0]) for i in range(envs)]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == max(lengths)
    for t, line in enumerate(lines, start=1):
        games_over = sum(n <= t for n in lengths)
        assert line.startswith(f"evaluating: {games_over}/{envs} games over after {t:,} steps"), line
    assert lines[-1].split("mean return so far ")[1].startswith(f"{np.mean(returns):.1f} ")
