"""rainbow_pruned.py's masks and schedules against their formulas (Zhu & Gupta 2017, Evci et al. 2020, JaxPruner)."""

import math

import pytest
import torch

from benchmark.scripts import load_script, training_parts

pruned = load_script("rainbow_pruned")


@pytest.mark.parametrize("step,expected", [(0, 0.0), (100, 0.0), (300, 0.9 * (1 - 0.5**3)), (420, 0.9 * (1 - 0.2**3)),
                                           (500, 0.9), (5000, 0.9)])
def test_gradual_schedule_is_the_cubic_formula(step, expected):
    assert pruned.gradual_sparsity(step, 100, 500, 0.9) == pytest.approx(expected, abs=1e-12)


def test_rigl_drop_fraction_decays_by_cosine_to_zero():
    assert pruned.rigl_drop_fraction(0, 1000, 0.2) == pytest.approx(0.2)
    assert pruned.rigl_drop_fraction(500, 1000, 0.2) == pytest.approx(0.1)
    assert pruned.rigl_drop_fraction(1000, 1000, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert pruned.rigl_drop_fraction(3000, 1000, 0.2) == pytest.approx(0.0, abs=1e-12)


def erk_by_bisection(shapes, sparsity):
    """Densities min(1, eps * sum(shape)/prod(shape)), eps solved by bisection so the kept weights match JaxPruner's
    total (sum of n - floor(sparsity * n))."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    target = sum(n - math.floor(sparsity * n) for n in sizes)
    low, high = 0.0, 1e9
    for _ in range(200):
        eps = (low + high) / 2
        kept = sum(min(1.0, eps * r) * n for r, n in zip(raw, sizes))
        low, high = (eps, high) if kept < target else (low, eps)
    return [1.0 - min(1.0, eps * r) for r in raw]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shapes", [
    [(16, 4, 3, 3), (32, 16, 3, 3), (512, 3872), (306, 512)],
    [(4, 2), (64, 64), (1024, 2048)],  # the small layer would exceed density 1: it stays dense
])
def test_erk_sparsities_match_the_formula(shapes, sparsity):
    sparsities = pruned.layer_sparsities(shapes, sparsity, "erk")
    for got, expected in zip(sparsities, erk_by_bisection(shapes, sparsity)):
        assert got == pytest.approx(expected, abs=1e-6)
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


@pytest.mark.parametrize("sparsify,expected", [
    ("bottleneck", ["psi.0"]),
    ("psi", ["psi.0", "head"]),
    ("all", None),
])
def test_sparsify_masks_only_the_layers_it_names(sparsify, expected):
    torch.manual_seed(0)
    args = pruned.Args(frame_size=24, method="static", sparsify=sparsify)
    net = pruned.QNetwork(6, args)
    optimizer = pruned.make_optimizer(net, args)
    pruned.Pruner(net, optimizer, args)
    masked = [name for name, m in net.named_modules() if hasattr(m, "weight_mask")]
    layers = [name for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert masked == (expected if expected is not None else layers)
    for name, module in net.named_modules():
        if name in layers and name not in masked:
            assert int((module.weight == 0).sum()) == 0  # untouched layers stay dense
    total = sum(net.get_submodule(n).weight.numel() for n in masked)
    zeros = sum(int((net.get_submodule(n).weight == 0).sum()) for n in masked)
    target = sum(math.floor(0.9 * net.get_submodule(n).weight.numel()) for n in masked)  # JaxPruner's total
    assert abs(zeros - target) <= len(masked) and total > zeros  # the target overall, within one weight a layer


def training_setup(method: str, **overrides):
    torch.manual_seed(0)
    args = pruned.Args(frame_size=24, buffer_size=600, batch_size=8, learning_rate=1e-3, method=method, cuda=False,
                       **overrides)
    parts = training_parts(pruned, args, torch.device("cpu"))
    pruner = pruned.Pruner(parts.net, parts.optimizer, args)
    parts.target_net.load_state_dict(parts.net.state_dict())  # with the initial masks, as main() does
    parts.replay.rewards.uniform_(-1, 1)
    return parts.net, parts.optimizer, pruner, parts.update


def test_pruned_weights_stay_zero_across_optimizer_steps():
    net, _, pruner, update = training_setup("static")
    masks = [m.weight_mask.clone() for m in pruner.layers]
    before = [m.weight.detach().clone() for m in pruner.layers]
    for _ in range(5):
        update()
    for module, mask, old in zip(pruner.layers, masks, before):
        assert torch.equal(module.weight_mask, mask)
        assert int((module.weight[mask == 0] != 0).sum()) == 0
        assert not torch.equal(module.weight[mask == 1], old[mask == 1])  # the kept weights did learn


def test_gradual_pruning_follows_its_schedule_between_mask_updates():
    net, _, pruner, update = training_setup("gradual", total_timesteps=1000, mask_update_every=2, sparsify="psi")
    shapes = [tuple(m.weight.shape) for m in pruner.layers]
    for _ in range(2):
        update()
    pruner.step(global_step=400, updates_before=1, updates=2)  # crosses a multiple of 2: masks are updated
    expected = pruned.layer_sparsities(shapes, pruned.gradual_sparsity(400, 40, 800, 0.9), "erk")
    for module, sparsity in zip(pruner.layers, expected):
        assert int((module.weight_mask == 0).sum()) == math.floor(sparsity * module.weight.numel())
        kept, pruned_away = module.weight.abs()[module.weight_mask == 1], module.weight.abs()[module.weight_mask == 0]
        assert pruned_away.max() == 0 and kept.min() > 0  # pruned by magnitude, and zeroed
    masks = [m.weight_mask.clone() for m in pruner.layers]
    pruner.step(global_step=700, updates_before=2, updates=3)  # no multiple of 2 crossed: nothing changes
    assert all(torch.equal(m.weight_mask, old) for m, old in zip(pruner.layers, masks))


def test_rigl_keeps_sparsity_grows_where_gradients_are_largest_and_resets_moments():
    net, optimizer, pruner, update = training_setup("rigl", sparsify="psi")
    for _ in range(3):
        update()
    module = pruner.layers[0]
    old_mask, weight, grad = module.weight_mask.clone(), module.weight.detach().clone(), module.weight.grad.clone()
    moments = {k: optimizer.state[module.weight][k].clone() for k in ("exp_avg", "exp_avg_sq")}
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
    assert int((module.weight[newly_active] != 0).sum()) == 0  # grown weights start at zero
    for key, before in moments.items():
        after = optimizer.state[module.weight][key]
        assert int((after[newly_active] != 0).sum()) == 0  # their Adam moments restart
        assert torch.equal(after[~newly_active], before[~newly_active])
