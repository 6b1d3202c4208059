"""rainbow_pruned.py's masks and schedules against their formulas (Zhu & Gupta 2017, Evci et al. 2020, JaxPruner)."""

import math
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmark.scripts import load_script, training_parts
from tests.helpers import erk_exact, zeros_at

pruned = load_script("rainbow_pruned")


@pytest.mark.parametrize(
    "step,expected", [(0, 0.0), (100, 0.0), (300, 0.9 * (1 - 0.5**3)), (420, 0.9 * (1 - 0.2**3)), (500, 0.9), (5000, 0.9)]
)
def test_gradual_schedule_is_the_cubic_formula(step, expected):
    assert pruned.gradual_sparsity(step, 100, 500, 0.9) == pytest.approx(expected, abs=1e-12)


def test_rigl_drop_fraction_decays_by_cosine_to_zero():
    assert pruned.rigl_drop_fraction(0, 1000, 0.2) == pytest.approx(0.2)
    assert pruned.rigl_drop_fraction(500, 1000, 0.2) == pytest.approx(0.1)
    assert pruned.rigl_drop_fraction(1000, 1000, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert pruned.rigl_drop_fraction(3000, 1000, 0.2) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize(
    "shapes",
    [
        [(16, 4, 3, 3), (32, 16, 3, 3), (512, 3872), (306, 512)],
        [(4, 2), (64, 64), (1024, 2048)],  # the small layer would exceed density 1: it stays dense
    ],
)
def test_erk_sparsities_match_the_formula(shapes, sparsity):
    sparsities = pruned.layer_sparsities(shapes, sparsity, "erk")
    for got, expected in zip(sparsities, erk_exact(shapes, sparsity)):
        assert got == pytest.approx(float(expected), abs=1e-9)
    kept = sum((1 - s) * math.prod(shape) for s, shape in zip(sparsities, shapes))
    assert kept == pytest.approx(sum(math.prod(shape) - math.floor(sparsity * math.prod(shape)) for shape in shapes))
    assert pruned.layer_sparsities(shapes, sparsity, "uniform") == [sparsity] * len(shapes)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999])
def test_masks_are_exactly_as_sparse_as_asked(sparsity):
    scores = torch.randn(37, 53)
    mask = pruned.top_mask(scores, sparsity)
    assert int((mask == 0).sum()) == math.floor(sparsity * scores.numel())
    if 0 < sparsity:
        assert scores[mask == 1].min() >= scores[mask == 0].max()  # the largest scores are the ones kept


def masked_tensors(module):
    """A masked layer's weight and, for a noisy layer, its weight_sigma (found by name, not by the script's helper)."""
    return [p for name, p in module.named_parameters(recurse=False) if name in ("weight", "weight_sigma")]


@pytest.mark.parametrize(
    "sparsify,extra_layers,expected",
    [
        ("bottleneck", 0, ["psi.layers.0"]),
        ("psi", 0, ["psi.layers.0", "head", "value_head"]),
        ("psi", 1, ["psi.layers.0", "psi.layers.1", "head", "value_head"]),  # a plain Linear among the noisy layers
        ("all", 1, None),
    ],
)
def test_sparsify_masks_only_the_layers_it_names(sparsify, extra_layers, expected):
    torch.manual_seed(0)
    args = pruned.Args(frame_size=24, method="static", sparsify=sparsify, extra_dense_layers=extra_layers)
    assert args.noisy and args.dueling  # the default agent: noisy dueling heads
    pruned.validate_args(args)  # --noisy is accepted
    net = pruned.QNetwork(6, args)
    optimizer = pruned.make_optimizer(net, args)
    pruned.Pruner(net, optimizer, args, 0, 100)
    masked = [name for name, m in net.named_modules() if hasattr(m, "weight_mask")]
    # every conv and dense layer: the modules holding a weight matrix or kernel (LayerNorm's weights are vectors)
    layers = [name[: -len(".weight")] for name, p in net.named_parameters() if name.endswith(".weight") and p.dim() > 1]
    assert masked == (expected if expected is not None else layers)
    for name, module in net.named_modules():
        if name in layers and name not in masked:
            assert int((module.weight == 0).sum()) == 0  # untouched layers stay dense
    total = sum(net.get_submodule(n).weight.numel() for n in masked)
    zeros = sum(int((net.get_submodule(n).weight == 0).sum()) for n in masked)
    target = sum(math.floor(0.9 * net.get_submodule(n).weight.numel()) for n in masked)  # JaxPruner's total
    assert abs(zeros - target) <= len(masked) and total > zeros  # the target overall, within one weight a layer
    for name in masked:
        module = net.get_submodule(name)
        for tensor in masked_tensors(module):  # noisy layers: weight_sigma is zero exactly where weight is masked
            assert torch.equal(tensor == 0, module.weight_mask == 0)
    psi_weights = [net.get_submodule(n).weight for n in ["psi.layers.0", "head", "value_head"]]
    psi_weights += [layer.weight for layer in net.psi.layers[1:]]
    assert pruned.effective_params(net, "psi") == sum(int((w != 0).sum()) for w in psi_weights)
    assert pruned.effective_params(net, "bottleneck") == int((net.psi.layers[0].weight != 0).sum())


def test_a_masked_noisy_connection_contributes_nothing():
    """With noise on, a noisy layer's output is the brute-force product with its masked perturbed weight matrix
    M * (W + sigma_W * outer(eps_out, eps_in)), W and sigma_W the weights from before masking (non-zero)."""
    torch.manual_seed(0)
    args = pruned.Args(frame_size=24, method="static", sparsify="psi")
    net = pruned.QNetwork(6, args)
    layer = net.head
    assert isinstance(layer, pruned.NoisyLinear)
    weight, sigma = layer.weight.detach().double().clone(), layer.weight_sigma.detach().double().clone()
    pruned.Pruner(net, pruned.make_optimizer(net, args), args, 0, 100)
    mask = layer.weight_mask.double()
    assert (mask == 0).any() and (weight[mask == 0] != 0).all() and (sigma[mask == 0] != 0).all()
    assert (layer.weight[mask == 0] == 0).all() and (layer.weight_sigma[mask == 0] == 0).all()

    layer.double()
    rows = 5
    x = torch.randn(rows, layer.weight.shape[1], dtype=torch.float64)
    eps_in, eps_out = layer.sample_noise(rows)
    noise = {layer.name: (eps_in.double(), eps_out.double())}
    with torch.no_grad():
        got = layer(x, noise)
    for r in range(rows):
        perturbed = mask * (weight + sigma * torch.outer(noise[layer.name][1][r], noise[layer.name][0][r]))
        expected = perturbed @ x[r] + layer.bias.detach() + layer.bias_sigma.detach() * noise[layer.name][1][r]
        assert torch.allclose(got[r], expected, rtol=0, atol=1e-12)


def training_setup(method: str, **overrides):
    torch.manual_seed(0)
    args = pruned.Args(
        frame_size=24, buffer_size=600, batch_size=8, learning_rate=1e-3, method=method, cuda=False, **overrides
    )
    parts = training_parts(pruned, args, torch.device("cpu"))  # the pruner's schedule: a run of args.total_timesteps
    parts.replay.rewards.uniform_(-1, 1)
    return parts.net, parts.optimizer, parts.pruner, parts.update


def test_pruned_weights_and_noise_scales_stay_zero_across_optimizer_steps():
    net, _, pruner, update = training_setup("static")
    noisy = [m for m in pruner.layers if isinstance(m, pruned.NoisyLinear)]
    assert len(noisy) == 3  # psi's first layer and both heads
    masks = [m.weight_mask.clone() for m in pruner.layers]
    before = [[t.detach().clone() for t in masked_tensors(m)] for m in pruner.layers]
    for _ in range(5):
        update()
        for module, mask in zip(pruner.layers, masks):
            assert torch.equal(module.weight_mask, mask)
            for tensor in masked_tensors(module):
                assert int((tensor[mask == 0] != 0).sum()) == 0
    for module, mask, old in zip(pruner.layers, masks, before):
        for tensor, old_tensor in zip(masked_tensors(module), old):
            assert not torch.equal(tensor[mask == 1], old_tensor[mask == 1])  # the kept weights and sigmas learn


@pytest.mark.parametrize("sparsity", [0.5, 0.9])  # 0.5: ERK keeps the first conv dense
def test_gradual_pruning_follows_jaxpruners_per_layer_schedule(sparsity):
    """Each layer's mask zeroes floor(s_l (1 - (1 - p)^3) n_l) weights, s_l the layer's ERK sparsity for the final
    target (computed once, as JaxPruner does), not ERK recomputed for the overall target of the moment."""
    torch.manual_seed(0)
    start, end = 100, 500
    args = pruned.Args(
        frame_size=24, method="gradual", sparsity=sparsity, sparsify="all", mask_update_every=1, total_timesteps=10**9
    )  # the schedule comes from start and end, not from total_timesteps
    net = pruned.QNetwork(6, args)
    pruner = pruned.Pruner(net, pruned.make_optimizer(net, args), args, start, end)
    shapes = [tuple(m.weight.shape) for m in pruner.layers]
    sizes = [math.prod(shape) for shape in shapes]
    final = erk_exact(shapes, sparsity)
    assert (sparsity == 0.5) == (final[0] == 0)  # the dense-layer case is exercised
    steps = [50, 99, 100, 101, 180, 300, 420, 499, 500, 900]
    for update, step in enumerate(steps):
        pruner.step(step, update, update + 1)  # crosses a multiple of mask_update_every: masks are updated
        expected = zeros_at(final, sizes, step, start, end)
        assert [int((m.weight_mask == 0).sum()) for m in pruner.layers] == expected, step
        for module in pruner.layers:
            magnitudes = module.weight.abs()
            assert magnitudes[module.weight_mask == 0].sum() == 0  # pruned weights are zeroed
            if (module.weight_mask == 0).any():
                assert magnitudes[module.weight_mask == 1].min() > 0  # by magnitude: the zeros go first
            for tensor in masked_tensors(module):
                assert int((tensor[module.weight_mask == 0] != 0).sum()) == 0
    # the schedule tells the two ways apart mid-way: ERK for the overall s(t) gives other per-layer counts
    overall = pruned.gradual_sparsity(300, start, end, sparsity)
    recomputed = [math.floor(s * n) for s, n in zip(pruned.layer_sparsities(shapes, overall, "erk"), sizes)]
    assert recomputed != zeros_at(final, sizes, 300, start, end)


def test_masks_do_not_change_between_mask_updates():
    net, _, pruner, update = training_setup("gradual", total_timesteps=1000, mask_update_every=2, sparsify="psi")
    update()
    update()
    pruner.step(global_step=400, updates_before=1, updates=2)  # crosses a multiple of 2: masks are updated
    masks = [m.weight_mask.clone() for m in pruner.layers]
    assert all((mask == 0).any() for mask in masks)
    pruner.step(global_step=700, updates_before=2, updates=3)  # no multiple of 2 crossed: nothing changes
    assert all(torch.equal(m.weight_mask, old) for m, old in zip(pruner.layers, masks))


def test_rigl_keeps_sparsity_grows_where_gradients_are_largest_and_resets_moments():
    net, optimizer, pruner, update = training_setup("rigl", sparsify="psi")
    for _ in range(3):
        update()
    module = pruner.layers[0]
    assert isinstance(module, pruned.NoisyLinear)
    old_mask, weight, grad = module.weight_mask.clone(), module.weight.detach().clone(), module.weight.grad.clone()
    tensors = masked_tensors(module)
    moments = [{k: optimizer.state[t][k].clone() for k in ("exp_avg", "exp_avg_sq")} for t in tensors]
    active = int(old_mask.sum())
    pruner.rigl(module, drop_fraction=0.3)

    new_mask = module.weight_mask
    assert int(new_mask.sum()) == active  # the layer's sparsity is unchanged
    dropped_count = math.floor(0.3 * active)
    active_scores = sorted(weight.abs()[old_mask == 1].tolist())
    survivors = (old_mask == 1) & (weight.abs() > active_scores[dropped_count - 1])
    assert torch.equal(new_mask[survivors], torch.ones(int(survivors.sum())))  # large weights survive the drop
    candidates = ~survivors
    grown = (new_mask == 1) & candidates
    assert grad.abs()[grown].min() >= grad.abs()[candidates & (new_mask == 0)].max()  # grown where |grad| is largest
    newly_active = (new_mask == 1) & (old_mask == 0)
    assert newly_active.any()
    for tensor, before in zip(tensors, moments):  # the weight and its noise scale alike
        assert int((tensor[newly_active] != 0).sum()) == 0  # grown connections start at zero
        for key, old in before.items():
            after = optimizer.state[tensor][key]
            assert int((after[newly_active] != 0).sum()) == 0  # their Adam moments restart
            assert torch.equal(after[~newly_active], old[~newly_active])
    net.apply_masks()
    for tensor in tensors:
        assert int((tensor[new_mask == 0] != 0).sum()) == 0  # the dropped ones are zero, noise included


def test_a_resume_with_more_timesteps_keeps_the_schedule(tmp_path):
    """The schedule's steps are fixed when the run starts: a resume with a larger --total-timesteps keeps them, so
    after the first run's t_end the masks stay at the final sparsity (a moved schedule would prune less)."""
    common = dict(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=24,
        learning_starts=20,
        buffer_size=300,
        batch_size=4,
        mask_update_every=2,
        checkpoint_every=50,
        diagnostics_every=20,
        diagnostics_batch_size=8,
        log_every=50,
        progress_seconds=1e9,
        cuda=False,
    )
    torch.manual_seed(0)
    first = pruned.main(pruned.Args(total_timesteps=100, output_dir=str(tmp_path), **common))
    run_dir = first["run_dir"]
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    loop = torch.load(checkpoint, weights_only=False)["loop"]
    assert (loop["prune_start_step"], loop["prune_end_step"]) == (4, 80)  # 0.04 and 0.8 of 100 steps

    args = pruned.Args(total_timesteps=200, output_dir=str(tmp_path), resume=run_dir, **common)
    resumed = pruned.main(args)
    assert resumed["env_steps"] == 200
    state = torch.load(checkpoint, weights_only=False)
    assert state["loop"]["global_step"] == 200
    assert (state["loop"]["prune_start_step"], state["loop"]["prune_end_step"]) == (4, 80)  # not (8, 160)

    net = pruned.QNetwork(3, args)  # Catch's 3 actions
    net.load_state_dict(state["net"])
    layers = [m for m in net.modules() if hasattr(m, "weight_mask")]
    shapes = [tuple(m.weight.shape) for m in layers]
    sizes = [math.prod(shape) for shape in shapes]
    final = erk_exact(shapes, 0.9)
    assert [int((m.weight_mask == 0).sum()) for m in layers] == zeros_at(final, sizes, 200, 4, 80)
    events = EventAccumulator(run_dir)
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("sparsity/overall")}
    final_overall = sum(zeros_at(final, sizes, 80, 4, 80)) / sum(sizes)
    moved_overall = sum(zeros_at(final, sizes, 120, 8, 160)) / sum(sizes)
    assert moved_overall < final_overall - 0.01  # what a schedule moved by the resume would log at step 120
    assert [logged[step] for step in (120, 140, 160, 180, 200)] == pytest.approx([final_overall] * 5, abs=1e-6)

    psi = [net.psi.layers[0], net.head, net.value_head]
    assert resumed["params_psi_effective"] == sum(int((m.weight != 0).sum()) for m in psi)
    assert resumed["params_bottleneck_effective"] == int((net.psi.layers[0].weight != 0).sum())
