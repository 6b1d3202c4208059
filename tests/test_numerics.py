"""Every script flushes denormal floats to zero on the CPU (`seeded_device`).

Adam's first moment of a weight whose gradient stops decays by beta1 = 0.9 each update, down through the denormal
range (below float32's smallest normal, 1.18e-38), where x86 CPUs compute many times slower. With the flag set by
`seeded_device`, it goes from a normal number straight to zero; without it, it passes through denormals, which shows
the test reaches them.
"""

import pytest
import torch

from benchmark.scripts import ALL_SCRIPTS, load_script

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def first_moments_while_decaying(module, args) -> list:
    """Adam's first moment of one weight over 200 updates: a gradient of 1e-30 once, then zero gradients."""
    holder = torch.nn.Module()  # make_optimizer takes a network: one with a single weight
    holder.weight = torch.nn.Parameter(torch.zeros(1))
    weight = holder.weight
    optimizer = module.make_optimizer(holder, args)
    moments = []
    for update in range(200):
        weight.grad = torch.full((1,), 1e-30 if update == 0 else 0.0)
        optimizer.step()
        moments.append(optimizer.state[weight]["exp_avg"].item())
    return moments


def is_denormal(value: float) -> bool:
    return 0.0 < abs(value) < SMALLEST_NORMAL


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_adam_moments_skip_the_denormal_range_after_seeding(name):
    module = load_script(name)
    args = module.Args(cuda=False)
    try:
        torch.set_flush_denormal(False)
        unflushed = first_moments_while_decaying(module, args)
        module.seeded_device(args)
        flushed = first_moments_while_decaying(module, args)
    finally:
        torch.set_flush_denormal(False)
    assert any(is_denormal(m) for m in unflushed)  # the decay does reach the denormal range
    assert not any(is_denormal(m) for m in flushed)
    assert flushed[0] == pytest.approx(1e-31) and flushed[-1] == 0.0
