"""Every script's process settings (`configure_process`, which `seeded_device` calls): denormal floats flushed to zero,
and freed gradient buffers kept in the heap.

Adam's first moment of a weight whose gradient stops decays by beta1 = 0.9 each update, down through the denormal
range (below float32's smallest normal, 1.18e-38), where x86 CPUs compute many times slower. With the flag set by
`seeded_device`, it goes from a normal number straight to zero; without it, it passes through denormals, which shows
the test reaches them.

The allocator: a dense layer as wide as DER's flattened bottleneck at scale 4 (7744 x 2048) trained with the scripts'
optimizer allocates 63 MB of gradients every update and frees them at the next zero_grad. Counted by the kernel, a
typical update (the median) faults those pages in again before `configure_process` (glibc gave them back to the
system) and not after it. Each script runs in a fresh process, so one script's setting cannot pass another's test.
"""

import resource
import subprocess
import sys

import pytest
import torch

from benchmark.scripts import ALL_SCRIPTS, ROOT, load_script

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


FAULTS_PER_UPDATE = """
import resource, sys
import torch
from benchmark.scripts import load_script

module = load_script(sys.argv[1])
args = module.Args(cuda=False)
layer = torch.nn.Linear(7744, 2048)  # DER's flattened bottleneck at scale 4: 63 MB of weights, and of gradients
optimizer = module.make_optimizer(layer, args)
inputs = torch.randn(8, 7744)


def update():
    optimizer.zero_grad(set_to_none=True)  # frees the gradients, as the scripts' update does
    layer(inputs).square().mean().backward()
    optimizer.step()


def median_page_faults_per_update(updates=6):
    # the median: after the setting the heap may still grow once in a while, and the update that grows it faults in
    for _ in range(2):  # warm-up: Adam's state and the first gradients
        update()
    counts = []
    for _ in range(updates):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        update()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[updates // 2]


before = median_page_faults_per_update()
module.configure_process(args)
print(before, median_page_faults_per_update())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's (Linux)")
@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_gradient_buffers_stay_in_the_heap_after_configuring(name):
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_UPDATE, name], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    before, after = (float(count) for count in result.stdout.split())
    gradient_pages = 7744 * 2048 * 4 // resource.getpagesize()
    assert before > 0.5 * gradient_pages  # without the setting, the gradient's pages are faulted in every update
    assert after < 100
