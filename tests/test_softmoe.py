"""rainbow_softmoe1.py's SoftMoE against a brute-force loop written from the equations (Puigcerver et al. 2024, as
Dopamine's labs/moes), its invariants, and the parameter counts of Figure 1."""

import math

import pytest
import torch

from benchmark.scripts import load_script

softmoe = load_script("rainbow_softmoe1")


@torch.no_grad()
def brute_force(layer, tokens):
    """Loops over samples, experts, slots and tokens, in float64."""
    x = tokens.double()
    router = layer.router.double()
    if layer.router_scale is not None:
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        router = layer.router_scale.double() * router / (router.norm(dim=0, keepdim=True) + 1e-6)
    w1, b1 = layer.bottleneck.weight.double(), layer.bottleneck.bias.double()[:, 0]
    w2, b2 = layer.expert_out.weight.double(), layer.expert_out.bias.double()[:, 0]
    batch, num_tokens, dim = x.shape
    experts, slots = layer.num_experts, layer.num_slots
    out = torch.zeros(batch, num_tokens, dim, dtype=torch.float64)
    for b in range(batch):
        logit = [[[sum(float(x[b, m, d]) * float(router[d, n, p]) for d in range(dim)) for p in range(slots)]
                  for n in range(experts)] for m in range(num_tokens)]
        slot_out = {}
        for n in range(experts):
            for p in range(slots):
                column = sum(math.exp(logit[m][n][p]) for m in range(num_tokens))
                slot_in = sum(math.exp(logit[m][n][p]) / column * tokens[b, m].double() for m in range(num_tokens))
                hidden = torch.relu(slot_in @ w1[n] + b1[n])
                slot_out[n, p] = hidden @ w2[n] + b2[n]
        for m in range(num_tokens):
            row = sum(math.exp(logit[m][n][p]) for n in range(experts) for p in range(slots))
            out[b, m] = sum(math.exp(logit[m][n][p]) / row * slot_out[n, p] for n in range(experts) for p in range(slots))
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("experts,capacity_factor", [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_softmoe_matches_brute_force(experts, capacity_factor, normalize):
    torch.manual_seed(experts)
    layer = softmoe.SoftMoE(token_dim=3, num_tokens=5, num_experts=experts, capacity_factor=capacity_factor,
                            hidden=4, normalize=normalize).double()
    if normalize:
        torch.nn.init.constant_(layer.router_scale, 1.7)
    assert layer.num_slots == math.ceil(5 * capacity_factor / experts)
    tokens = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(tokens), brute_force(layer, tokens), rtol=1e-9, atol=1e-9)


def test_dispatch_and_combine_are_distributions_and_tokens_are_equivariant():
    torch.manual_seed(0)
    layer = softmoe.SoftMoE(token_dim=8, num_tokens=10, num_experts=2, capacity_factor=1.0, hidden=16,
                            normalize=False).double()
    tokens = torch.randn(4, 10, 8, dtype=torch.float64)
    dispatch, combine = layer.routing(tokens)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(4, 2, 5, dtype=torch.float64))  # over tokens, per slot
    torch.testing.assert_close(combine.sum((2, 3)), torch.ones(4, 10, dtype=torch.float64))  # over slots, per token
    permutation = torch.randperm(10)
    torch.testing.assert_close(layer(tokens[:, permutation]), layer(tokens)[:, permutation])


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("experts", [1, 2, 4])
def test_parameter_counts(scale, experts):
    net = softmoe.QNetwork(18, softmoe.Args(scale=scale, num_experts=experts))
    tokens, dim, width = 121, 32, 512 * scale  # Impala output 11x11x32 for 84x84 frames
    slots = math.ceil(tokens / experts)
    assert net.psi.num_slots == slots and net.psi.router.numel() == dim * experts * slots
    assert net.bottleneck.weight.numel() == experts * dim * width  # C x 512*scale per expert (Figure 1)
    assert net.psi.expert_out.weight.numel() == experts * width * dim
    assert net.head.weight.shape == (18 * 51, tokens * dim)  # flattened tokens straight to the head, as Dopamine


def test_dormant_counting_sees_every_expert_unit():
    net = softmoe.QNetwork(4, softmoe.Args(frame_size=24, scale=1, num_experts=2))
    seen = []
    hook = net.psi.relu.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    fractions = softmoe.dormant_fractions(net, torch.randint(0, 255, (3, 4, 24, 24), dtype=torch.uint8), 0.001)
    hook.remove()
    assert seen == [(3 * net.psi.num_slots, 2 * 512)]  # rows: (sample, slot); columns: (expert, unit)
    assert 0.0 <= fractions["psi"] <= 1.0 and 0.0 <= fractions["phi"] <= 1.0
