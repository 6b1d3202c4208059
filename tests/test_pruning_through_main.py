"""rainbow_pruned.py's main() on Catch ends sparse, as its schedule says, across a resume: the masks in the half-way
checkpoint, the masks logged at every diagnostics step, the final model and summary.json's effective parameter counts,
all against counts computed by hand (tests/test_pruning.py checks the Pruner and its formulas on their own)."""

import glob
import math
import os
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmark.scripts import load_script
from tests.helpers import erk_exact, zeros_at

pruned = load_script("rainbow_pruned")

CATCH_RUN = dict(
    env_backend="gymnasium",
    env_id="toy_envs.catch:Catch-v0",
    frame_size=16,
    learning_starts=20,
    train_frequency=1,
    buffer_size=300,
    batch_size=4,
    sparsity=0.9,
    sparsify="all",
    distribution="erk",
    diagnostics_every=20,
    diagnostics_batch_size=8,
    log_every=50,
    progress_seconds=1e9,
    cuda=False,
    save_model=True,
)


def masked_layers(state_dict) -> list:
    """The layers holding a mask (a buffer named weight_mask), in the network's order. psi's first layer is also
    the network's `bottleneck` attribute, so the state dict names it twice: it is counted once, as psi.layers.0."""
    layers = []
    for key in state_dict:
        if key.endswith(".weight_mask") and not key.startswith("bottleneck."):
            layers.append(key[: -len(".weight_mask")])
    return layers


def zero_counts(state_dict, layers) -> list:
    return [int((state_dict[f"{layer}.weight_mask"] == 0).sum()) for layer in layers]


def assert_pruned_weights_are_zero(state_dict, layers):
    """Where a mask is 0 the weight is exactly 0, and so is a noisy layer's weight_sigma (no noise either)."""
    sigmas = 0
    for layer in layers:
        mask = state_dict[f"{layer}.weight_mask"]
        assert torch.equal(mask, (mask != 0).float()), layer  # a mask holds only zeros and ones
        assert int((state_dict[f"{layer}.weight"][mask == 0] != 0).sum()) == 0, layer
        if f"{layer}.weight_sigma" in state_dict:
            sigmas += 1
            assert int((state_dict[f"{layer}.weight_sigma"][mask == 0] != 0).sum()) == 0, layer
    assert sigmas == 3  # psi's noisy first layer and both noisy heads were checked


def assert_summary_counts_the_model(summary, model):
    """summary.json's effective parameters are the final model's non-zero weights: the bottleneck (psi's first
    layer), and psi with its heads."""
    psi = [key for key in model if key.startswith("psi.layers.") and key.endswith(".weight")]
    psi += ["head.weight", "value_head.weight"]
    assert summary["params_bottleneck_effective"] == int(model["psi.layers.0.weight"].count_nonzero())
    assert summary["params_psi_effective"] == sum(int(model[key].count_nonzero()) for key in psi)


def logged_zero_counts(run_dir, layers, sizes) -> dict:
    """step -> each layer's zero count, from the fractions sparsity/<layer> that Pruner.log writes."""
    events = EventAccumulator(run_dir)
    events.Reload()
    counts = {}
    for layer, size in zip(layers, sizes):
        for event in events.Scalars(f"sparsity/{layer}"):
            counts.setdefault(event.step, []).append(round(event.value * size))  # float32 is exact enough here
    return counts


def mask_update_steps(learning_starts, every, start, last_step) -> list:
    """The agent steps where gradual pruning updates the masks, by hand: with --train-frequency 1 one gradient update
    follows every step after learning starts, so after step t the update count is t - learning_starts; the masks are
    updated right after the update whose count is a multiple of `every`, from the schedule's start step on."""
    steps = []
    for t in range(learning_starts + 1, last_step + 1):
        if (t - learning_starts) % every == 0 and t >= start:
            steps.append(t)
    return steps


def test_gradual_pruning_through_main_and_a_resume(tmp_path):
    """A 100-step run, then resumed to 200 steps. The schedule is fixed by the first run: prune_start 0.3 and
    prune_end 1.0 of 100 steps, steps 30 to 100, kept on resume (not 60 to 200). Masks update every 45 updates, at
    steps 65, 110, 155 and 200: the half-way checkpoint holds step 65's masks, half way along the cubic schedule."""
    common = dict(
        CATCH_RUN,
        method="gradual",
        prune_start=0.3,
        prune_end=1.0,
        mask_update_every=45,
        checkpoint_every=100,
        output_dir=str(tmp_path),
    )
    first = pruned.main(pruned.Args(total_timesteps=100, **common))
    run_dir = first["run_dir"]
    half = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    loop = half["loop"]
    assert (loop["global_step"], loop["updates"]) == (100, 80)  # one update a step after step 20
    assert (loop["prune_start_step"], loop["prune_end_step"]) == (30, 100)
    assert mask_update_steps(20, 45, 30, 200) == [65, 110, 155, 200]

    layers = masked_layers(half["net"])
    shapes = [tuple(half["net"][f"{layer}.weight"].shape) for layer in layers]
    sizes = [math.prod(shape) for shape in shapes]
    final = erk_exact(shapes, 0.9)  # each layer's ERK sparsity for the final target, computed once
    half_way = zeros_at(final, sizes, 65, 30, 100)  # p = 35/70: each layer at 1 - (1/2)^3 of its final sparsity
    assert half_way != [0] * len(layers) and half_way != zeros_at(final, sizes, 100, 30, 100)  # neither end
    assert zero_counts(half["net"], layers) == half_way
    assert_pruned_weights_are_zero(half["net"], layers)

    resumed = pruned.main(pruned.Args(total_timesteps=200, resume=run_dir, **common))
    assert resumed["env_steps"] == 200
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["model"]
    assert masked_layers(model) == layers
    assert zero_counts(model, layers) == zeros_at(final, sizes, 200, 30, 100)  # the final target
    assert_pruned_weights_are_zero(model, layers)
    assert_summary_counts_the_model(resumed, model)

    # every diagnostics step of both runs logged the masks of the last mask update before it (none: no zeros)
    logged = logged_zero_counts(run_dir, layers, sizes)
    assert set(logged) >= set(range(20, 201, 20))
    for step in logged:
        updates_so_far = [t for t in mask_update_steps(20, 45, 30, 200) if t <= step]
        expected = zeros_at(final, sizes, updates_so_far[-1], 30, 100) if updates_so_far else [0] * len(layers)
        assert logged[step] == expected, step


@pytest.fixture
def keep_signal_handlers():
    """main() stopped by SIGTERM exits at once and leaves its handlers installed: put the test process's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_rigl_through_main_and_a_preempted_resume(tmp_path, monkeypatch, keep_signal_handlers):
    """A 200-step RigL run stopped right after its half-way checkpoint, as by a SIGTERM then, and resumed. RigL's drop
    fraction falls to 0 at prune_end (step 160 here), so the run is stopped within its schedule rather than made
    shorter (a 100-step run would end its schedule by step 100, and the resumed half would change no mask)."""
    common = dict(
        CATCH_RUN,
        method="rigl",
        prune_end=0.8,
        rigl_update_every=10,
        total_timesteps=200,
        checkpoint_every=100,
        output_dir=str(tmp_path),
    )
    write_atomically = pruned.write_atomically

    def write_then_stop(state, path):
        write_atomically(state, path)
        if state["loop"]["global_step"] == 100:
            # what a SIGTERM arriving now would run: main()'s handler, after which main() exits with PREEMPTED
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    monkeypatch.setattr(pruned, "write_atomically", write_then_stop)
    with pytest.raises(SystemExit) as stopped:
        pruned.main(pruned.Args(**common))
    assert stopped.value.code == pruned.PREEMPTED
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "*"))
    half = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert half["loop"]["global_step"] == 100 and half["loop"]["prune_end_step"] == 160

    layers = masked_layers(half["net"])
    shapes = [tuple(half["net"][f"{layer}.weight"].shape) for layer in layers]
    sizes = [math.prod(shape) for shape in shapes]
    target = [math.floor(s * n) for s, n in zip(erk_exact(shapes, 0.9), sizes)]  # RigL starts at the target
    assert sum(target) > 0
    assert zero_counts(half["net"], layers) == target
    assert_pruned_weights_are_zero(half["net"], layers)

    resumed = pruned.main(pruned.Args(resume=run_dir, **common))
    assert resumed["env_steps"] == 200
    model = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["model"]
    assert zero_counts(model, layers) == target  # drop and grow: each layer's count of active weights is kept
    changed = [
        layer for layer in layers if not torch.equal(model[f"{layer}.weight_mask"], half["net"][f"{layer}.weight_mask"])
    ]
    assert "psi.layers.0" in changed  # the masks went on changing after the resume (the bottleneck's at least)
    # ... from the half-way masks: each RigL update drops at most floor(d(t) * active) of a layer's active weights,
    # d(t) = 0.2 (1 + cos(pi min(t / 160, 1))) / 2, so at most their sum of the half-way active ones can be gone
    rigl_steps = [t for t in range(101, 201) if (t - 20) % 10 == 0]  # update count t - 20, a RigL update every 10
    for layer in layers:
        before, after = half["net"][f"{layer}.weight_mask"], model[f"{layer}.weight_mask"]
        active = int(before.sum())
        at_most = 0
        for t in rigl_steps:
            at_most += math.floor(0.2 * (1 + math.cos(math.pi * min(t / 160, 1))) / 2 * active)
        assert int((before * (1 - after)).sum()) <= at_most, layer
    assert_pruned_weights_are_zero(model, layers)
    assert_summary_counts_the_model(resumed, model)
    logged = logged_zero_counts(run_dir, layers, sizes)
    assert set(logged) >= set(range(20, 201, 20)) - {100}  # step 100's events are lost on resume, as above
    for step in logged:
        assert logged[step] == target, step  # the same at every diagnostics step, before and after the resume
