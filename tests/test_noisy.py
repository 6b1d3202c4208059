"""Noisy nets as labs/moes full Rainbow uses them: per-sample factorised noise against a brute-force loop, the way the
loss, the target and action selection draw it, and parameter counts (weights and noise scales) against a formula."""

import pytest
import torch

from benchmark.scripts import ALL_SCRIPTS, SCRIPTS, load_script

gap = load_script("rainbow_impala_gap")


def scaled_noise(e: torch.Tensor) -> torch.Tensor:
    return e.sign() * e.abs().sqrt()  # Fortunato et al. (2018), eq. 11


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_per_sample_noise_equals_a_loop_over_perturbed_weight_matrices(name):
    """Row r's output is x_r (W + sigma_W * outer(eps_out_r, eps_in_r))^T + b + sigma_b * eps_out_r, built per row."""
    module = load_script(name)
    torch.manual_seed(0)
    layer = module.NoisyLinear(7, 5).double()
    layer.name = "layer"
    with torch.no_grad():
        layer.weight_sigma.uniform_(0.1, 0.5)  # scales that differ per weight, so a transposed product would show
        layer.bias_sigma.uniform_(0.1, 0.5)
    x = torch.randn(4, 7, dtype=torch.float64)
    eps_in = scaled_noise(torch.randn(4, 7, dtype=torch.float64))
    eps_out = scaled_noise(torch.randn(4, 5, dtype=torch.float64))
    output = layer(x, {"layer": (eps_in, eps_out)})

    for r in range(4):
        weight = torch.zeros(5, 7, dtype=torch.float64)
        for o in range(5):
            for i in range(7):
                weight[o, i] = layer.weight[o, i] + layer.weight_sigma[o, i] * eps_out[r, o] * eps_in[r, i]
        bias = layer.bias + layer.bias_sigma * eps_out[r]
        torch.testing.assert_close(output[r], weight @ x[r] + bias, rtol=1e-12, atol=1e-12)

    shared = layer(x, {"layer": (eps_in[:1], eps_out[:1])})  # one row of noise serves the whole batch
    for r in range(4):
        torch.testing.assert_close(shared[r], layer(x[r : r + 1], {"layer": (eps_in[:1], eps_out[:1])})[0])
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # no noise: the mean weights


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_noise_draws_have_the_factorised_distribution(name):
    """eps = f(N(0, 1)) with f(e) = sign(e) sqrt|e|: E[eps] = 0, E[eps^2] = E|e| = sqrt(2/pi)."""
    module = load_script(name)
    torch.manual_seed(0)
    layer = module.NoisyLinear(3, 2)
    eps_in, eps_out = layer.sample_noise(200_000)
    assert eps_in.shape == (200_000, 3) and eps_out.shape == (200_000, 2)
    assert abs(float(eps_in.mean())) < 0.01
    assert abs(float((eps_in**2).mean()) - (2 / torch.pi) ** 0.5) < 0.01


def test_dopamine_noisy_initialisation():
    """mu ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, sigma = 0.1/sqrt(fan_in) (Dopamine NoisyNetwork)."""
    torch.manual_seed(0)
    layer = gap.NoisyLinear(400, 300)
    bound = 400**-0.5
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
    assert layer.bias.abs().max() <= bound
    assert torch.all(layer.weight_sigma == 0.1 * bound) and torch.all(layer.bias_sigma == 0.1 * bound)


def tiny_args(module, **overrides):
    return module.Args(frame_size=24, cuda=False, **overrides)


def test_loss_draws_per_sample_noise_online_and_one_shared_draw_for_target_and_selector():
    """labs/moes keys the online network per sample in the loss (vmap over split keys) and hands target_output one key
    for the batch, used by both the target network and the double-DQN selector."""
    torch.manual_seed(0)
    args = tiny_args(gap)
    net, target_net = gap.QNetwork(3, args), gap.QNetwork(3, args)
    rows_drawn, calls = [], []
    draw = net.sample_noise

    def recording_draw(rows):
        rows_drawn.append(rows)
        return draw(rows)

    def recording_forward(network, label):
        forward = network.forward

        def recorded(x, noise=None):
            calls.append((label, x.shape[0], noise))
            return forward(x, noise)

        return recorded

    net.sample_noise = recording_draw
    net.forward = recording_forward(net, "online")
    target_net.forward = recording_forward(target_net, "target")
    batch = dict(
        obs=torch.randint(0, 255, (6, 4, 24, 24), dtype=torch.uint8),
        actions=torch.randint(0, 3, (6,)),
        returns=torch.randn(6),
        discounts=torch.full((6,), 0.97),
        next_obs=torch.randint(0, 255, (6, 4, 24, 24), dtype=torch.uint8),
    )
    gap.c51_losses(net, target_net, batch, double_dqn=True)

    assert rows_drawn == [6, 1]
    (online_label, _, online_noise), (target_label, _, target_noise), (selector_label, _, selector_noise) = calls
    assert (online_label, target_label, selector_label) == ("online", "target", "online")
    assert online_noise["head"][0].shape == (6, 512)  # one row per sample
    assert target_noise["head"][0].shape == (1, 512)  # one row for the batch
    assert selector_noise is target_noise  # the same draw perturbs the target network and the selector


def test_actions_draw_noise_per_env_in_training_and_none_in_evaluation():
    torch.manual_seed(0)
    net = gap.QNetwork(4, tiny_args(gap))
    obs = torch.randint(0, 255, (1, 4, 24, 24), dtype=torch.uint8).repeat(64, 1, 1, 1)  # 64 envs, one observation
    zero = torch.zeros(())
    greedy = gap.select_actions(net, obs, zero, with_noise=False)
    assert torch.equal(greedy, net.q_values(obs).argmax(1))  # the mean weights
    with torch.no_grad():
        for layer in (net.head, net.value_head, net.bottleneck):
            layer.weight_sigma.mul_(200.0)  # noise large enough to change the greedy action
            layer.bias_sigma.mul_(200.0)
    noisy = gap.select_actions(net, obs, zero, with_noise=True)
    assert len(set(noisy.tolist())) > 1  # each env drew its own noise: the same observation, different actions


def impala_params(channels_in: int, blocks: int = 2) -> int:
    total, previous = 0, channels_in
    for c in (16, 32, 32):
        total += 3 * 3 * previous * c + c  # the stack's first conv
        total += blocks * 2 * (3 * 3 * c * c + c)  # residual blocks of two convs
        previous = c
    return total


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("pooling", ["flatten", "gap"])
def test_parameter_counts_with_noisy_layers(scale, pooling):
    """Every noisy layer holds weight, bias, weight sigma and bias sigma: 2 (in * out + out) parameters."""
    actions, atoms, width = 18, 51, 512 * scale
    inputs = 11 * 11 * 32 if pooling == "flatten" else 32

    def noisy(fan_in, fan_out):
        return 2 * (fan_in * fan_out + fan_out)

    expected = impala_params(4) + noisy(inputs, width) + noisy(width, actions * atoms) + noisy(width, atoms)
    net = gap.QNetwork(actions, gap.Args(scale=scale, pooling=pooling))
    assert sum(p.numel() for p in net.parameters()) == expected
    plain = gap.QNetwork(actions, gap.Args(scale=scale, pooling=pooling, noisy=False, dueling=False))
    expected_plain = impala_params(4) + (inputs * width + width) + (width * actions * atoms + actions * atoms)
    assert sum(p.numel() for p in plain.parameters()) == expected_plain


@pytest.mark.parametrize("name", SCRIPTS)
def test_default_agent_is_labs_moes_full_rainbow(name):
    args = load_script(name).Args()
    assert args.noisy and args.dueling and args.double_dqn
    assert not args.tf32  # float32 on CUDA, as the paper ran
