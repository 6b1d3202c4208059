"""C51 projection, importance weights and the epsilon schedule against independent references."""

import math

import numpy as np
import pytest
import torch

from benchmark.scripts import load_script
from tests.helpers import brute_force_projection

gap = load_script("rainbow_impala_gap")


def test_projection_matches_brute_force():
    rng = np.random.default_rng(0)
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    rewards = rng.uniform(-3, 3, size=64)
    discounts = rng.choice([0.0, 0.99**3, 1.0, 0.5], size=64)
    probs = rng.dirichlet(np.ones(51), size=64)
    target_support = torch.tensor(rewards[:, None] + discounts[:, None] * support.numpy()[None])
    projected = gap.project_distribution(target_support, torch.tensor(probs), support)
    for i in range(64):
        expected = brute_force_projection(target_support[i].numpy(), probs[i], support.numpy())
        np.testing.assert_allclose(projected[i].numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(projected.sum(1).numpy(), 1.0, atol=1e-10)


def test_importance_weights_formula():
    probs = torch.tensor([0.1, 0.4, 0.025, 0.2])
    weights = gap.importance_weights(probs)
    expected = [math.sqrt(0.025 / p) for p in probs.tolist()]  # (1/sqrt p) / max (1/sqrt p)
    torch.testing.assert_close(weights, torch.tensor(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 1.0), (19_999, 1.0), (20_000, 1.0), (20_000 + 125_000, 1 - 0.99 / 2), (20_000 + 250_000, 0.01), (10**7, 0.01)],
)
def test_epsilon_schedule(step, expected):
    assert gap.linear_schedule(step, 20_000, 250_000, 0.01) == pytest.approx(expected)
