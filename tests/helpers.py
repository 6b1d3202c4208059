"""Helpers several test files use: running the scripts and the sweep as a user does, reading TensorBoard events, and
the brute-force references (C51 projection, JaxPruner's ERK and schedule) that more than one test checks against."""

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmark.scripts import ROOT, script_path

# a short run of any script; train frequency 4 is the flagship's replay ratio in every script (DER's default is 1)
SHORT_RUN = (
    "--total-timesteps 240 --learning-starts 120 --buffer-size 1000 --iteration-steps 100 --log-every 40 "
    "--diagnostics-every 100 --progress-seconds 0 --no-cuda --train-frequency 4"
).split()
CATCH = ["--env-backend", "gymnasium", "--env-id", "toy_envs.catch:Catch-v0", "--frame-size", "24"]
# the same kind of run as the sweep's `--arg-sets` string
CATCH_RUN = (
    "env_backend=gymnasium frame_size=24 total_timesteps=150 learning_starts=100 buffer_size=500 no-cuda "
    "progress_seconds=1e9 checkpoint_every=150"
)
# a sweep run without updates (learning never starts): a few thousand steps a second, long enough to be signalled
# while it runs
LONG_RUN = (
    "env_backend=gymnasium frame_size=24 total_timesteps=30000 learning_starts=1000000 buffer_size=500 "
    "no-cuda progress_seconds=0.2 checkpoint_every=1000000"
)


def run_script(name, args, tmp_path):
    command = [sys.executable, script_path(name), "--output-dir", str(tmp_path), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_sweep(*flags):
    command = [sys.executable, "benchmark/sweep.py", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def scalars(run_dir, tag):
    events = EventAccumulator(run_dir)
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def brute_force_projection(target_support, probs, support):
    """Bellemare et al. (2017), Algorithm 1: split each atom's mass between its two neighbours."""
    v_min, v_max, n = support[0], support[-1], len(support)
    delta = (v_max - v_min) / (n - 1)
    out = np.zeros(n)
    for z, p in zip(target_support, probs):
        z = min(max(z, v_min), v_max)
        b = (z - v_min) / delta
        lower, upper = math.floor(b), math.ceil(b)
        if lower == upper:
            out[lower] += p
        else:
            out[lower] += p * (upper - b)
            out[upper] += p * (b - lower)
    return out


def erk_exact(shapes, sparsity):
    """JaxPruner's ERK sparsities, in exact fractions: densities min(1, eps * sum(shape) / prod(shape)), eps such
    that the kept weights total JaxPruner's sum of n - floor(sparsity * n). Found by trying every number k of dense
    layers (the k with the highest raw density) and keeping the k whose eps is consistent: dense layers at or over
    density 1, the others at or under it."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [Fraction(sum(shape), size) for shape, size in zip(shapes, sizes)]
    kept = sum(size - math.floor(sparsity * size) for size in sizes)
    order = sorted(range(len(shapes)), key=lambda i: raw[i], reverse=True)
    for k in range(len(shapes)):
        dense, sparse = order[:k], order[k:]
        eps = (kept - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in sparse)
        if all(eps * raw[i] >= 1 for i in dense) and all(eps * raw[i] <= 1 for i in sparse):
            return [Fraction(0) if i in dense else 1 - eps * raw[i] for i in range(len(shapes))]
    raise AssertionError("no consistent eps")


def zeros_at(final_sparsities, sizes, step, start, end):
    """JaxPruner's per-layer zero counts at `step`: floor(s_l * (1 - (1 - p)^3) * n_l), exactly."""
    progress = Fraction(min(max(step - start, 0), end - start), end - start)
    factor = 1 - (1 - progress) ** 3
    return [math.floor(s * factor * n) for s, n in zip(final_sparsities, sizes)]
