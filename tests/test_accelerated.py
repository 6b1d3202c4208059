"""`--compile` and `--cudagraphs` compute what the plain loop computes (CUDA cases run where a GPU is present)."""

import math

import pytest
import torch
import torch._inductor.config

from benchmark.scripts import ALL_SCRIPTS, load_script, training_parts
from tests.helpers import scalars

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def updated_state(module, args, device: torch.device, updates: int = 4) -> dict:
    """Parameters, Adam moments, priorities and loss sums after `updates` updates from a seeded start."""
    torch.manual_seed(0)
    parts = training_parts(module, args, device)
    parts.replay.rewards.uniform_(-1, 1)
    parts.replay.episode_end[::7] = True
    torch.manual_seed(1)
    for _ in range(updates):
        parts.update()
    moments = [parts.optimizer.state[p]["exp_avg_sq"] for p in parts.net.parameters()]
    return dict(
        params=[p.detach().clone() for p in parts.net.parameters()],
        moments=moments,
        priorities=parts.replay.priorities.clone(),
        max_priority=parts.replay.max_priority.clone(),
        stats=parts.stats.clone(),
    )


def assert_same_state(actual: dict, expected: dict):
    for key in expected:
        for a, e in zip(
            actual[key] if isinstance(actual[key], list) else [actual[key]],
            expected[key] if isinstance(expected[key], list) else [expected[key]],
        ):
            # Adam divides by sqrt(v), so rounding in near-zero gradients moves a few weights by up to ~lr/4 (noisy
            # layers add such gradients); a different batch or a missed step moves them by ~lr (1e-3)
            torch.testing.assert_close(a, e, rtol=1e-3, atol=4e-4, msg=lambda m: f"{key}: {m}")


def small_args(module, **overrides):
    return module.Args(frame_size=24, buffer_size=600, batch_size=8, learning_rate=1e-3, **overrides)


@pytest.mark.parametrize("name", ALL_SCRIPTS)
@torch._inductor.config.patch(fallback_random=True)  # compiled code draws eager's random numbers
def test_compiled_update_matches_eager_on_cpu(name):
    module = load_script(name)
    expected = updated_state(module, small_args(module), torch.device("cpu"))
    torch._dynamo.reset()
    actual = updated_state(module, small_args(module, compile=True), torch.device("cpu"))
    assert_same_state(actual, expected)
    assert expected["stats"][0] > 0


@CUDA
@pytest.mark.parametrize("name", ALL_SCRIPTS)
@pytest.mark.parametrize("compile", [False, True])
@torch._inductor.config.patch(fallback_random=True)
def test_cuda_graph_update_matches_eager(name, compile):
    module = load_script(name)
    expected = updated_state(module, small_args(module), torch.device("cuda"), updates=8)
    torch._dynamo.reset()
    actual = updated_state(module, small_args(module, cudagraphs=True, compile=compile), torch.device("cuda"), updates=8)
    assert_same_state(actual, expected)


@CUDA
@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_cuda_graph_run_end_to_end(name, tmp_path):
    module = load_script(name)
    args = module.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=24,
        total_timesteps=400,
        learning_starts=100,
        buffer_size=1000,
        train_frequency=4,
        log_every=50,
        progress_seconds=1e9,
        cudagraphs=True,
        output_dir=str(tmp_path),
    )
    summary = module.main(args)
    assert summary["updates"] == (400 - 100) // 4 and summary["device"] == "cuda"
    losses = scalars(summary["run_dir"], "losses/td_loss")
    assert len(losses) >= 5 and all(math.isfinite(loss) for loss in losses)
