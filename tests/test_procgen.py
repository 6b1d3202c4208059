"""rainbow_procgen_gap.py: Procgen's frames, level split and evaluation, the RGB replay, normalised scores, and the
script run end to end (a real Procgen game, learning Catch, determinism, bad input).

The runs play starpilot: its first episodes end within about 120 steps whatever constant action an untrained
network picks, so the evaluations stay short (bigfish or coinrun can reach their 1000-step limit)."""

import glob
import json
import os

import numpy as np
import pytest
import torch
import tyro

from benchmark.scripts import load_script
from tests.helpers import SHORT_RUN, run_script, scalars

NAME = "rainbow_procgen_gap"
procgen_gap = load_script(NAME)
procgen = pytest.importorskip("procgen")


def small_args(**overrides):
    return procgen_gap.Args(**{**dict(cuda=False, progress_seconds=1e9), **overrides})


@pytest.fixture
def recorded_procgen(monkeypatch):
    """Every ProcgenGym3Env the script builds, with the kwargs it passed (the real env is still built)."""
    calls, real = [], procgen.ProcgenGym3Env

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(procgen, "ProcgenGym3Env", recording)
    return calls


def test_procgen_frames_are_64x64_rgb_as_procgen_renders_them():
    envs = procgen_gap.make_env(small_args(env_id="coinrun", num_envs=3, seed=5))
    first = envs.reset()
    frames, rewards, terminated, truncated = envs.step(np.zeros(3, np.int64))
    envs.close()
    assert first.shape == frames.shape == (3, 3, 64, 64) and frames.dtype == np.uint8
    assert rewards.shape == terminated.shape == truncated.shape == (3,)
    # procgen itself, built with the same level set and seed and stepped the same way
    reference = procgen.ProcgenGym3Env(
        num=3, env_name="coinrun", num_levels=200, start_level=0, distribution_mode="easy", rand_seed=5
    )
    assert np.array_equal(first, reference.observe()[1]["rgb"].transpose(0, 3, 1, 2))
    reference.act(np.zeros(3, np.int32))
    assert np.array_equal(frames, reference.observe()[1]["rgb"].transpose(0, 3, 1, 2))
    assert not np.array_equal(frames[:, 0], frames[:, 1])  # colour kept: the channels differ
    assert envs.num_actions == 15


def test_training_uses_200_easy_levels_and_evaluation_unseen_levels(recorded_procgen):
    args = small_args(env_id="starpilot", num_envs=2, eval_episodes=3, frame_size=64)
    procgen_gap.make_env(args).close()
    net = procgen_gap.QNetwork(15, args)
    returns = procgen_gap.evaluate(net, args, torch.device("cpu"), seed=10_001)
    training, evaluation = recorded_procgen
    assert training == dict(num=2, env_name="starpilot", num_levels=200, start_level=0, distribution_mode="easy", rand_seed=1)
    assert evaluation["num"] == 3 and evaluation["num_levels"] == 0 and evaluation["distribution_mode"] == "easy"
    assert evaluation["rand_seed"] != training["rand_seed"]
    assert len(returns) == 3


def test_normalised_score_uses_the_easy_and_hard_ranges():
    # Cobbe et al. (2020)'s ranges: bigfish easy [1, 40], starpilot easy [2.5, 64], fruitbot easy [-1.5, 32.4],
    # caveflyer hard [2, 13.4]
    assert procgen_gap.normalized_score("bigfish", "easy", 20.5) == pytest.approx((20.5 - 1) / 39)
    assert procgen_gap.normalized_score("starpilot", "easy", 64.0) == pytest.approx(1.0)
    assert procgen_gap.normalized_score("starpilot", "easy", 10.0) == pytest.approx(7.5 / 61.5)
    assert procgen_gap.normalized_score("fruitbot", "easy", 0.0) == pytest.approx(1.5 / 33.9)
    assert procgen_gap.normalized_score("caveflyer", "hard", 5.0) == pytest.approx(3 / 11.4)
    assert procgen_gap.normalized_score("toy_envs.catch:Catch-v0", "easy", 1.0) is None
    assert procgen_gap.normalized_score("bigfish", "easy", None) is None
    assert sorted(procgen_gap.PROCGEN_SCORE_RANGES) == sorted(procgen_gap.PROCGEN_GAMES)
    assert len(procgen_gap.PROCGEN_GAMES) == 16


def test_replay_rebuilds_colour_stacks_zero_padded_at_episode_starts():
    stack, num_envs, size, steps = 4, 2, 6, 40
    replay = procgen_gap.DeviceReplay(1000, num_envs, size, stack, 3, 0.99, torch.device("cpu"))
    rng = np.random.default_rng(0)
    frames = rng.integers(1, 256, (steps, num_envs, 3, size, size), dtype=np.uint8)  # never all zero
    ended = rng.random((steps, num_envs)) < 0.2
    obs = torch.zeros(num_envs, stack, 3, size, size, dtype=torch.uint8)
    obs[:, -1] = torch.from_numpy(frames[0])
    acted_on = []  # the stacks the agent acted on, built as the training loop builds them
    for t in range(steps):
        acted_on.append(obs.clone())
        replay.add(
            obs[:, -1],
            torch.zeros(num_envs),
            torch.zeros(num_envs),
            torch.from_numpy(ended[t]),
            torch.zeros(num_envs, dtype=torch.bool),
        )
        if t + 1 < steps:
            obs = procgen_gap.advance_stack(obs, torch.from_numpy(frames[t + 1]), torch.from_numpy(ended[t]))
    replay.flush()  # 40 steps: one batch of 32 written by itself, 8 held back until now
    for env in range(num_envs):
        for t in range(steps):
            expected = np.zeros((stack, 3, size, size), np.uint8)  # brute force: walk back until an episode start
            for k in range(stack):
                j = t - (stack - 1 - k)
                if j >= 0 and not ended[j:t, env].any():
                    expected[k] = frames[j, env]
            rebuilt = replay._stacks(torch.tensor([env * replay.capacity + t]))[0]
            assert rebuilt.shape == (stack, 3, size, size)
            assert np.array_equal(rebuilt.numpy(), expected), (env, t)
            assert np.array_equal(acted_on[t][env].numpy(), expected), (env, t)
    batch = replay.sample(8)
    assert batch["obs"].shape == batch["next_obs"].shape == (8, stack, 3, size, size)
    net = procgen_gap.QNetwork(5, small_args(frame_size=size, frame_stack=stack))
    assert net.phi.stacks[0].conv.in_channels == 3 * stack and net(batch["obs"]).shape == (8, 5, 51)


def test_replay_memory_estimate_counts_rgb_frames():
    replay = procgen_gap.DeviceReplay(4096, 2, 64, 4, 3, 0.99, torch.device("cpu"))
    held = sum(
        getattr(replay, name).nbytes for name in ["frames", "actions", "rewards", "terminal", "episode_end", "priorities"]
    )
    assert held == procgen_gap.DeviceReplay.bytes_needed(4096, 64) == 4096 * (3 * 64 * 64 + 14)
    assert 12e9 < procgen_gap.DeviceReplay.bytes_needed(1_000_000, 64) < 12.5e9


class EpisodesOfDifferentLengths:
    """Env i's episodes last i+1 steps; its first episode returns i+1, later ones 100 a step (so any episode counted
    after the first, or any env counted twice, shows)."""

    num_actions, frames_per_step = 3, 1

    def __init__(self, num_envs):
        self.t, self.lengths = np.zeros(num_envs, int), np.arange(1, num_envs + 1)
        self.episodes = np.zeros(num_envs, int)

    def reset(self):
        return np.zeros((len(self.t), 3, 16, 16), np.uint8)

    def step(self, actions):
        self.t += 1
        rewards = np.where(self.episodes == 0, 1.0, 100.0).astype(np.float32)
        terminated = self.t == self.lengths
        self.t[terminated], self.episodes[terminated] = 0, self.episodes[terminated] + 1
        return self.reset(), rewards, terminated, np.zeros(len(self.t), bool)

    def close(self):
        pass


def test_evaluation_counts_exactly_one_episode_per_env(monkeypatch):
    made = []

    def make_env(args, num_envs=None, seed=None, evaluation=False):
        made.append(dict(num_envs=num_envs, evaluation=evaluation))
        return EpisodesOfDifferentLengths(num_envs)

    monkeypatch.setattr(procgen_gap, "make_env", make_env)
    args = small_args(frame_size=16, eval_episodes=7)
    returns = procgen_gap.evaluate(procgen_gap.QNetwork(3, args), args, torch.device("cpu"), seed=0)
    assert returns == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert made == [dict(num_envs=7, evaluation=True)]


class ScriptedRewards:
    """Two envs whose step t gives REWARDS[t] (rewards above, inside and below [-1, 1]); both episodes end at the
    last step, so the run's training return is the mean of the two episodes' sums of the game's rewards."""

    num_actions, frames_per_step = 3, 1
    REWARDS = np.array([[-3.0, 0.25], [2.0, -0.5], [7.5, 1.0]], np.float32)  # (step, env)

    def __init__(self):
        self.t = 0

    def reset(self):
        return np.zeros((2, 3, 16, 16), np.uint8)

    def step(self, actions):
        rewards = self.REWARDS[self.t].copy()
        self.t += 1
        ended = np.full(2, self.t == len(self.REWARDS))
        return self.reset(), rewards, ended, np.zeros(2, bool)

    def close(self):
        pass


@pytest.mark.parametrize("clip", [True, False])
def test_clip_rewards_decides_the_rewards_the_replay_stores(clip, monkeypatch, tmp_path):
    """--clip-rewards (the default) stores rewards clipped to [-1, 1], --no-clip-rewards the game's; the training
    return adds up the game's rewards either way. The replay is read from the checkpoint written at the last step."""
    assert procgen_gap.Args().clip_rewards  # the default: clipped, as the script always did
    monkeypatch.setattr(procgen_gap, "make_env", lambda args, num_envs=None, seed=None, evaluation=False: ScriptedRewards())
    flags = [
        "--no-cuda",
        "--frame-size",
        "16",
        "--num-envs",
        "2",
        "--total-timesteps",
        "6",
        "--buffer-size",
        "100",
        "--checkpoint-every",
        "6",
        "--eval-episodes",
        "0",
        "--progress-seconds",
        "1e9",
        "--output-dir",
        str(tmp_path),
        "--clip-rewards" if clip else "--no-clip-rewards",
    ]
    args = tyro.cli(procgen_gap.Args, args=flags)
    assert args.clip_rewards is clip
    summary = procgen_gap.main(args)
    replay = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)["replay"]
    assert replay["adds"] == 3
    capacity = 100 // 2  # env i's stream holds its step t in slot i * capacity + t
    stored = replay["rewards"].view(2, capacity)[:, :3].T  # (step, env)
    if clip:
        expected = [[-1.0, 0.25], [1.0, -0.5], [1.0, 1.0]]
    else:
        expected = [[-3.0, 0.25], [2.0, -0.5], [7.5, 1.0]]
    assert stored.tolist() == expected
    assert summary["final_return"] == pytest.approx(((-3.0 + 2.0 + 7.5) + (0.25 - 0.5 + 1.0)) / 2)


def test_short_procgen_run_writes_summary_and_events(tmp_path):
    result = run_script(NAME, ["--env-id", "starpilot", "--eval-episodes", "4", "--save-model", *SHORT_RUN], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "replay: 1,000 transitions" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["script"] == f"{NAME}.py" and summary["env_id"] == "starpilot"
    assert summary["env_steps"] == summary["frames"] == 240 and summary["updates"] == (240 - 120) // 4
    assert summary["params_bottleneck"] == 32 * 512  # GAP: Impala's 8x8x32 output pooled to 32
    # psi's weights by hand: the bottleneck, the head (Procgen's 15 actions x 51 atoms) and dueling's value head
    assert summary["params_psi"] == 32 * 512 + 512 * 15 * 51 + 512 * 51
    assert [it["step"] for it in summary["returns_by_iteration"]] == [100, 200, 240]
    evaluations = summary["eval_by_iteration"]
    assert [it["step"] for it in evaluations] == [100, 200, 240] and all(it["episodes"] == 4 for it in evaluations)
    assert len(summary["eval_returns"]) == 4
    test_return = float(np.mean(summary["eval_returns"]))
    assert summary["test_return"] == summary["eval_return"] == evaluations[-1]["mean_return"]
    assert summary["test_return"] == pytest.approx(test_return)
    assert summary["normalized_score"] == pytest.approx((test_return - 2.5) / (64 - 2.5))
    assert summary["train_return"] == summary["final_return"] == summary["returns_by_iteration"][-1]["mean_return"]
    assert os.path.exists(os.path.join(run_dir, "model.pt"))
    assert len(scalars(run_dir, "eval/mean_return")) == 3
    for tag in [
        "losses/td_loss",
        "losses/q_values",
        "charts/SPS",
        "charts/epsilon",
        "charts/episodic_return",
        "diagnostics/dormant_fraction_phi",
        "diagnostics/dormant_fraction_psi",
        "diagnostics/bottleneck_feature_norm",
    ]:
        assert scalars(run_dir, tag), tag


def test_same_seed_gives_identical_losses_and_evaluations(tmp_path):
    runs = []
    for attempt in range(2):
        args = small_args(
            env_id="starpilot",
            total_timesteps=120,
            learning_starts=40,
            buffer_size=500,
            iteration_steps=60,
            eval_episodes=2,
            log_every=8,
            output_dir=str(tmp_path / str(attempt)),
        )
        summary = procgen_gap.main(args)
        runs.append(
            (scalars(summary["run_dir"], "losses/td_loss"), summary["eval_by_iteration"], summary["returns_by_iteration"])
        )
    assert len(runs[0][0]) >= 8
    assert runs[0] == runs[1]


BAD_INPUTS = [
    (["--env-id", "NoSuchGame"], "unknown env id 'NoSuchGame' for procgen"),
    (["--env-id", "toy_envs.catch:Catch-v0"], "use --env-backend gymnasium"),
    (["--env-backend", "gymnasium", "--env-id", "CartPole-v1"], "does not give uint8 image observations"),
    (["--scale", "0"], "--scale must be positive"),
    (["--num-levels", "-1"], "--num-levels must not be negative"),
    (["--buffer-size", str(10**10)], "lower --buffer-size"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_fails_with_one_clear_line(args, message, tmp_path):
    result = run_script(NAME, args, tmp_path)
    assert result.returncode == procgen_gap.BAD_INPUT
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
