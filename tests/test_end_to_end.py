"""The scripts as a user runs them: the command line, outputs on disk, determinism, and bad input."""

import glob
import json
import os

import pytest

from benchmark.scripts import SCRIPTS, load_script
from tests.helpers import CATCH, SHORT_RUN, run_script, scalars


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("backend,env_id", [("envpool", "Pong-v5"), ("gymnasium", "ALE/Pong-v5")])
def test_short_pong_run_writes_summary_and_events(name, backend, env_id, tmp_path):
    result = run_script(
        name, ["--env-backend", backend, "--env-id", env_id, "--eval-episodes", "0", "--save-model", *SHORT_RUN], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "replay: 1,000 transitions" in result.stdout and "SPS" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    for key in [
        "script",
        "args",
        "env_id",
        "seed",
        "env_steps",
        "frames",
        "updates",
        "wall_seconds",
        "device",
        "params_total",
        "params_bottleneck",
        "returns_by_iteration",
        "final_return",
    ]:
        assert key in summary
    assert summary["script"] == f"{name}.py"
    assert summary["env_steps"] == 240 and summary["frames"] == 960
    assert summary["updates"] == (240 - 120) // 4
    defaults = load_script(name).Args()
    flattened = getattr(defaults, "pooling", "gap") == "flatten"  # the sparse baselines' default
    channels = 64 if defaults.encoder == "nature" else 32  # DER's default phi is the Nature CNN: 11x11x64
    assert summary["params_bottleneck"] == (11 * 11 * channels if flattened else channels) * 512
    # psi's weights by hand, biases and noise scales left out: Pong's 6 actions x 51 atoms, and dueling's value head
    heads = 512 * 6 * 51 + 512 * 51
    psi = {"rainbow_softmoe1": 512 * 32 + 11 * 11 * 32 * (6 * 51 + 51)}.get(name, heads)  # the heads read all tokens
    assert summary["params_psi"] == summary["params_bottleneck"] + psi
    assert [it["step"] for it in summary["returns_by_iteration"]] == [100, 200, 240]
    assert os.path.exists(os.path.join(run_dir, "model.pt"))
    for tag in [
        "losses/td_loss",
        "losses/q_values",
        "charts/SPS",
        "charts/epsilon",
        "diagnostics/dormant_fraction_phi",
        "diagnostics/dormant_fraction_psi",
        "diagnostics/bottleneck_feature_norm",
    ]:
        assert scalars(run_dir, tag), tag


@pytest.mark.parametrize("name", SCRIPTS)
def test_episodes_and_evaluation_on_catch(name, tmp_path):
    result = run_script(name, [*CATCH, *SHORT_RUN, "--eval-episodes", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert sum(it["episodes"] for it in summary["returns_by_iteration"]) == 240 // 7  # catch episodes last 7 steps
    assert len(summary["eval_returns"]) == 3 and all(r in (-1.0, 1.0) for r in summary["eval_returns"])
    assert len(scalars(run_dir, "charts/episodic_return")) == 240 // 7


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_seed_gives_identical_losses(name, tmp_path):
    module = load_script(name)
    losses = []
    for attempt in range(2):
        args = module.Args(
            env_backend="gymnasium",
            env_id="toy_envs.catch:Catch-v0",
            frame_size=24,
            total_timesteps=200,
            learning_starts=60,
            buffer_size=500,
            train_frequency=1,
            log_every=10,
            progress_seconds=1e9,
            cuda=False,
            output_dir=str(tmp_path / str(attempt)),
        )
        summary = module.main(args)
        losses.append(scalars(summary["run_dir"], "losses/td_loss"))
    assert len(losses[0]) >= 10
    assert losses[0] == losses[1]


def test_a_fractional_train_frequency_gives_several_updates_a_step(tmp_path):
    """--train-frequency 0.5: two updates an agent step, the paper's replay ratio of 2."""
    module = load_script("rainbow_impala_gap")
    summary = module.main(
        module.Args(
            env_backend="gymnasium",
            env_id="toy_envs.catch:Catch-v0",
            frame_size=24,
            total_timesteps=60,
            learning_starts=40,
            buffer_size=500,
            train_frequency=0.5,
            progress_seconds=1e9,
            cuda=False,
            output_dir=str(tmp_path),
        )
    )
    assert summary["updates"] == 2 * (60 - 40)


BAD_INPUTS = [
    (["--env-id", "NoSuchGame-v5"], "unknown env id"),
    (["--env-backend", "gymnasium", "--env-id", "ALE/NoSuchGame-v5"], "cannot make env"),
    (["--env-backend", "gymnasium", "--env-id", "CartPole-v1"], "does not give uint8 image observations"),
    (["--env-id", "CartPole-v1"], "not a pixel-based Atari env"),
    (["--scale", "0"], "--scale must be positive"),
    (["--buffer-size", "-5"], "--buffer-size must be positive"),
    (["--buffer-size", str(10**10)], "lower --buffer-size"),
    (["--cudagraphs", "--no-cuda"], "--cudagraphs needs a CUDA device"),
    (["--env-backend", "gymnasium", "--env-id", "toy_envs.catch:ContinuousCatch-v0"], "needs discrete actions"),
    (["--output-dir", "/dev/null/runs"], "cannot write to the run folder"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must not be negative"),
    (["--encoder", "nature", "--encoder-extra-blocks", "2"], "they shape only the Impala encoder"),
]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_fails_with_one_clear_line(name, args, message, tmp_path):
    result = run_script(name, args, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
