"""rainbow_softmoe1.py's SoftMoE against a brute-force loop written from the equations (Puigcerver et al. 2024, as
Dopamine's labs/moes), its noisy experts (labs/moes ExpertModel) against a per-sample loop, its invariants, the
network's noise and mean weights, dormant counting, and the parameter counts of Figure 1."""

import math

import pytest
import torch

from benchmark.scripts import load_script

softmoe = load_script("rainbow_softmoe1")


def first_layer(layer, n, eps=None):
    """Expert n's first layer as a float64 weight (in, out) and bias (out,): the mean ones, or the ones one sample
    sees under its noise eps = (eps_in, eps_out): W_n + sigma_n * outer(eps_in, eps_out) and b_n + sigma_b,n * eps_out
    (factorised noise, Fortunato et al. 2018, eqs. 10-11, in the experts' (in, out) layout)."""
    weight, bias = layer.weight[n].double(), layer.bias[n, 0].double()
    if eps is None:
        return weight, bias
    eps_in, eps_out = eps[0].double(), eps[1].double()
    weight = weight + layer.weight_sigma[n].double() * torch.outer(eps_in, eps_out)
    bias = bias + layer.bias_sigma[n, 0].double() * eps_out
    return weight, bias


@torch.no_grad()
def brute_force(layer, tokens, noise=None):
    """Loops over samples, experts, slots and tokens, in float64. noise: (eps_in, eps_out) of the experts' first
    layer, one row per sample, shared by every expert and slot of that sample (labs/moes); None: mean weights."""
    x = tokens.double()
    router = layer.router.double()
    if layer.router_scale is not None:
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        router = layer.router_scale.double() * router / (router.norm(dim=0, keepdim=True) + 1e-6)
    w2, b2 = layer.expert_out.weight.double(), layer.expert_out.bias.double()[:, 0]
    batch, num_tokens, dim = x.shape
    experts, slots = layer.num_experts, layer.num_slots
    out = torch.zeros(batch, num_tokens, dim, dtype=torch.float64)
    for b in range(batch):
        logit = [
            [
                [sum(float(x[b, m, d]) * float(router[d, n, p]) for d in range(dim)) for p in range(slots)]
                for n in range(experts)
            ]
            for m in range(num_tokens)
        ]
        slot_out = {}
        for n in range(experts):
            w1, b1 = first_layer(layer.bottleneck, n, None if noise is None else (noise[0][b], noise[1][b]))
            for p in range(slots):
                column = sum(math.exp(logit[m][n][p]) for m in range(num_tokens))
                slot_in = sum(math.exp(logit[m][n][p]) / column * tokens[b, m].double() for m in range(num_tokens))
                hidden = torch.relu(slot_in @ w1 + b1)
                slot_out[n, p] = hidden @ w2[n] + b2[n]
        for m in range(num_tokens):
            row = sum(math.exp(logit[m][n][p]) for n in range(experts) for p in range(slots))
            out[b, m] = sum(math.exp(logit[m][n][p]) / row * slot_out[n, p] for n in range(experts) for p in range(slots))
    return out


def randomise_sigmas(layer):
    """Distinct noise scales per expert, input and output, so a mixed-up layout or expert cannot pass."""
    with torch.no_grad():
        layer.weight_sigma.copy_(torch.randn_like(layer.weight_sigma))
        layer.bias_sigma.copy_(torch.randn_like(layer.bias_sigma))


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("experts,capacity_factor", [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_softmoe_matches_brute_force(experts, capacity_factor, normalize, noisy):
    torch.manual_seed(experts)
    layer = softmoe.SoftMoE(
        token_dim=3,
        num_tokens=5,
        num_experts=experts,
        capacity_factor=capacity_factor,
        hidden=4,
        normalize=normalize,
        noisy=noisy,
    ).double()
    if normalize:
        torch.nn.init.constant_(layer.router_scale, 1.7)
    assert layer.num_slots == math.ceil(5 * capacity_factor / experts)
    tokens = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(tokens), brute_force(layer, tokens), rtol=1e-9, atol=1e-9)  # mean weights
    if noisy:
        randomise_sigmas(layer.bottleneck)
        layer.bottleneck.name = "experts"
        eps_in, eps_out = layer.bottleneck.sample_noise(2)
        noise = {"experts": (eps_in.double(), eps_out.double())}
        torch.testing.assert_close(layer(tokens, noise), brute_force(layer, tokens, noise["experts"]), rtol=1e-9, atol=1e-9)


def test_noisy_expert_layer_matches_a_per_sample_loop():
    """Each sample r draws one (eps_in, eps_out), shared by every expert n and slot p (labs/moes hands each expert
    the same key): slot (r, n, p) maps x to x (W_n + sigma_n * outer(eps_in[r], eps_out[r])) + b_n +
    sigma_b,n * eps_out[r]. One row of noise is shared by the whole batch; no noise leaves the mean weights."""
    torch.manual_seed(0)
    batch, experts, slots, inputs, outputs = 3, 2, 4, 5, 6
    layer = softmoe.NoisyExpertLinear(experts, inputs, outputs).double()
    randomise_sigmas(layer)
    layer.name = "experts"
    assert layer.weight.shape == layer.weight_sigma.shape == (experts, inputs, outputs)
    assert layer.bias.shape == layer.bias_sigma.shape == (experts, 1, outputs)
    eps_in, eps_out = layer.sample_noise(batch)
    assert eps_in.shape == (batch, inputs) and eps_out.shape == (batch, outputs)
    eps_in, eps_out = eps_in.double(), eps_out.double()
    x = torch.randn(batch, experts, slots, inputs, dtype=torch.float64)

    def loop(rows_eps):
        expected = torch.zeros(batch, experts, slots, outputs, dtype=torch.float64)
        for r in range(batch):
            for n in range(experts):
                weight, bias = first_layer(layer, n, None if rows_eps is None else rows_eps(r))
                for p in range(slots):
                    expected[r, n, p] = x[r, n, p] @ weight + bias
        return expected

    with torch.no_grad():
        per_sample = layer(x, {"experts": (eps_in, eps_out)})
        shared = layer(x, {"experts": (eps_in[:1], eps_out[:1])})
        mean = layer(x)
    torch.testing.assert_close(per_sample, loop(lambda r: (eps_in[r], eps_out[r])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared, loop(lambda r: (eps_in[0], eps_out[0])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, loop(None), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(per_sample, mean)


def noisy_dense_reference(layer, x, eps=None):
    """A NoisyLinear (weight (out, in)) row by row in float64: W + sigma_W * outer(eps_out[r], eps_in[r])."""
    rows = []
    for r in range(x.shape[0]):
        weight, bias = layer.weight.double(), layer.bias.double()
        if eps is not None:
            weight = weight + layer.weight_sigma.double() * torch.outer(eps[1][r].double(), eps[0][r].double())
            bias = bias + layer.bias_sigma.double() * eps[1][r].double()
        rows.append(weight @ x[r] + bias)
    return torch.stack(rows)


@torch.no_grad()
def network_reference(net, obs, noise=None):
    """The C51 logits from the parts, in float64: phi's tokens, the brute-force SoftMoE, then the dueling heads."""
    noise = noise or {}
    hidden = brute_force(net.psi, net.tokens(obs).double(), noise.get("psi.bottleneck")).flatten(1)
    advantages = noisy_dense_reference(net.head, hidden, noise.get("head")).view(obs.shape[0], net.num_actions, -1)
    value = noisy_dense_reference(net.value_head, hidden, noise.get("value_head")).unsqueeze(1)
    return value + advantages - advantages.mean(dim=1, keepdim=True)


def test_network_noise_reaches_the_experts_and_none_means_mean_weights():
    torch.manual_seed(0)
    args = softmoe.Args(frame_size=16, num_experts=2)  # 2x2 tokens of 32; full Rainbow's noisy, dueling defaults
    net = softmoe.QNetwork(3, args)  # float32: phi scales its uint8 input to float32; the reference is float64
    assert isinstance(net.bottleneck, softmoe.NoisyExpertLinear)
    randomise_sigmas(net.bottleneck)
    noise = net.sample_noise(2)
    assert set(noise) == {"psi.bottleneck", "head", "value_head"}  # the experts' second layer stays plain
    assert noise["psi.bottleneck"][0].shape == (2, 32) and noise["psi.bottleneck"][1].shape == (2, 512)
    obs = torch.randint(0, 255, (2, 4, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        mean, noisy = net(obs), net(obs, noise)
    torch.testing.assert_close(mean.double(), network_reference(net, obs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noisy.double(), network_reference(net, obs, noise), rtol=1e-4, atol=1e-5)
    without_expert_noise = {name: eps for name, eps in noise.items() if name != "psi.bottleneck"}
    without = network_reference(net, obs, without_expert_noise)
    assert (noisy.double() - without).abs().max() > 1e-3  # the experts' noise counts, far beyond the tolerance
    plain = softmoe.QNetwork(3, softmoe.Args(frame_size=16, num_experts=2, noisy=False))
    assert isinstance(plain.bottleneck, softmoe.ExpertLinear) and plain.sample_noise(2) == {}


def test_dispatch_and_combine_are_distributions_and_tokens_are_equivariant():
    torch.manual_seed(0)
    layer = softmoe.SoftMoE(
        token_dim=8, num_tokens=10, num_experts=2, capacity_factor=1.0, hidden=16, normalize=False, noisy=False
    ).double()
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
    with torch.no_grad():  # slot inputs mix phi's non-negative tokens, so non-negative weights keep units alive...
        net.bottleneck.weight.abs_()
        net.bottleneck.bias.fill_(0.1)
        net.bottleneck.weight[0, :, :100] = 0.0  # ...except 100 units of expert 0 and 30 of expert 1, which never fire
        net.bottleneck.bias[0, :, :100] = -1.0
        net.bottleneck.weight[1, :, 200:230] = 0.0
        net.bottleneck.bias[1, :, 200:230] = -1.0
    seen = []
    hook = net.psi.relu.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    fractions = softmoe.dormant_fractions(net, torch.randint(0, 255, (3, 4, 24, 24), dtype=torch.uint8), 0.001)
    hook.remove()
    assert seen == [(3 * net.psi.num_slots, 2 * 512)]  # rows: (sample, slot); columns: (expert, unit)
    assert fractions["psi"] == (100 + 30) / (2 * 512)
    assert 0.0 <= fractions["phi"] <= 1.0
