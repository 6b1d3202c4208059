"""The network against the paper's formulas (Section 2.1, Figure 1, equation 1) and flax's SAME padding."""

import pytest
import torch

from benchmark.scripts import load_script

gap = load_script("rainbow_impala_gap")


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("pooling", ["flatten", "gap", "max"])
def test_bottleneck_parameter_counts(scale, pooling):
    net = gap.QNetwork(18, gap.Args(scale=scale, pooling=pooling))
    h, w, c = 11, 11, 32  # Impala output for 84x84 frames
    assert net.feature_shape == (c, h, w)
    inputs = h * w * c if pooling == "flatten" else c
    assert net.bottleneck.weight.numel() == inputs * 512 * scale
    assert net.head.weight.shape == (18 * 51, 512 * scale)


def test_nature_encoder_uses_same_padding():
    net = gap.QNetwork(6, gap.Args(encoder="nature", pooling="flatten"))
    assert net.feature_shape == (64, 11, 11)  # ceil(84/4)=21 -> ceil(21/2)=11 -> 11
    assert net.bottleneck.weight.numel() == 11 * 11 * 64 * 512


def test_depth_and_encoder_scale():
    """Figure 8's extra layer as labs/moes `use_extra_linear_layer` (512 wide, plain), or scaled like psi's first."""
    net = gap.QNetwork(4, gap.Args(extra_dense_layers=2, scale=2, encoder_scale=2, layer_norm=True))
    assert [tuple(m.weight.shape) for m in net.psi.layers] == [(1024, 64), (512, 1024), (512, 512)]
    assert [type(m).__name__ for m in net.psi.layers] == ["NoisyLinear", "Linear", "Linear"]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net.psi.modules()) == 3
    assert net.head.weight.shape == (4 * 51, 512)
    assert net.feature_shape == (64, 11, 11)
    scaled = gap.QNetwork(4, gap.Args(extra_dense_layers=2, scale=2, extra_dense_scaled=True))
    assert [tuple(m.weight.shape) for m in scaled.psi.layers] == [(1024, 32), (1024, 1024), (1024, 1024)]
    assert all(type(m).__name__ == "NoisyLinear" for m in scaled.psi.layers)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_extra_encoder_blocks_deepen_the_last_impala_stack():
    """Figure 4: residual blocks of two 3x3 convolutions (32 -> 32 channels, with biases) added to phi's last stack."""
    base, deeper = gap.QNetwork(6, gap.Args()), gap.QNetwork(6, gap.Args(encoder_extra_blocks=4))

    assert parameter_count(deeper.phi) - parameter_count(base.phi) == 4 * 2 * (3 * 3 * 32 * 32 + 32)
    assert [len(stack.blocks) for stack in deeper.phi.stacks] == [2, 2, 6]
    assert deeper.feature_shape == base.feature_shape == (32, 11, 11)
    assert deeper(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 6, 51)


def test_encoder_blocks_per_stack_as_dopamine_num_blocks():
    """labs/moes `ImpalaEncoder.num_blocks`: every stack gets the same number of residual blocks."""
    base, deeper = gap.QNetwork(6, gap.Args()), gap.QNetwork(6, gap.Args(encoder_blocks=3))

    added = sum(2 * (3 * 3 * c * c + c) for c in (16, 32, 32))  # one block of two convs in each stack
    assert parameter_count(deeper.phi) - parameter_count(base.phi) == added
    assert [len(stack.blocks) for stack in deeper.phi.stacks] == [3, 3, 3]


def test_nature_encoder_uses_rainbow_cnnet_xavier_initialisers():
    """labs/moes RainbowCNNet: flax Conv with Xavier-uniform kernels, bound sqrt(6 / (fan_in + fan_out)), zero bias."""
    torch.manual_seed(0)
    net = gap.QNetwork(6, gap.Args(encoder="nature"))
    for conv, (c_in, c_out, k) in zip(net.phi.convs, [(4, 32, 8), (32, 64, 4), (64, 64, 3)]):
        bound = (6 / (c_in * k * k + c_out * k * k)) ** 0.5
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.95 * bound  # uniform over the whole range, not a narrower one
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_gap_is_equation_1_and_max_is_global_max():
    torch.manual_seed(0)
    maps = torch.randn(3, 5, 7, 6)  # (batch, C, H, W)
    expected_mean = torch.zeros(3, 5)
    expected_max = torch.full((3, 5), -float("inf"))
    for b in range(3):
        for c in range(5):
            total = 0.0
            for i in range(7):
                for j in range(6):
                    total += maps[b, c, i, j].item()
                    expected_max[b, c] = max(expected_max[b, c].item(), maps[b, c, i, j].item())
            expected_mean[b, c] = total / (7 * 6)
    torch.testing.assert_close(gap.Bottleneck("gap")(maps), expected_mean)
    torch.testing.assert_close(gap.Bottleneck("max")(maps), expected_max)
    assert gap.Bottleneck("flatten")(maps).shape == (3, 5 * 7 * 6)


@pytest.mark.parametrize("size,kernel,stride", [(84, 3, 2), (42, 3, 2), (21, 3, 2), (84, 8, 4), (21, 4, 2), (11, 3, 1)])
def test_pad_same_matches_tensorflow_rule(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    x = torch.ones(1, 1, size, size)
    padded = gap.pad_same(x, kernel, stride)
    assert padded.shape[-2:] == (size + total, size + total)
    before, after = total // 2, total - total // 2  # the smaller half first (top, left), the larger after
    rows, columns = padded[0, 0].sum(1) > 0, padded[0, 0].sum(0) > 0  # which rows and columns hold the image
    for held in (rows, columns):
        assert held.tolist() == [False] * before + [True] * size + [False] * after
    assert torch.nn.functional.max_pool2d(padded, kernel, stride).shape[-1] == out


def test_impala_max_pooling_pads_with_minus_infinity():
    """flax's max_pool with SAME padding ignores the padding: a map of -5 everywhere pools to -5, borders included
    (zero padding would give 0 at the bottom and right edges)."""
    stack = gap.ImpalaStack(1, 1, blocks=0)
    with torch.no_grad():
        stack.conv.weight.zero_()
        stack.conv.bias.fill_(-5.0)
    pooled = stack(torch.zeros(1, 1, 84, 84))
    assert pooled.shape[-2:] == (42, 42)
    assert torch.equal(pooled, torch.full_like(pooled, -5.0))


def test_dueling_and_noisy_heads_shapes():
    net = gap.QNetwork(5, gap.Args(dueling=True, noisy=True, scale=1))
    x = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    assert net(x).shape == (2, 5, 51)
    torch.testing.assert_close(net(x), net(x))  # no noise given: the mean weights (evaluation)
    assert not torch.equal(net(x, net.sample_noise(2)), net(x, net.sample_noise(2)))  # fresh noise on every draw
    assert sorted(net.sample_noise(1)) == ["head", "psi.layers.0", "value_head"]
    assert gap.QNetwork(5, gap.Args(noisy=False)).sample_noise(2) == {}


def test_dormant_fraction_counts_dead_units():
    net = gap.QNetwork(3, gap.Args(scale=1))
    with torch.no_grad():
        net.bottleneck.weight.abs_()
        net.bottleneck.bias.fill_(0.1)  # every psi unit fires on every input...
        net.bottleneck.weight[:100] = 0.0
        net.bottleneck.bias[:100] = -1.0  # ...except 100 of the 512, which never can
    x = torch.randint(0, 255, (16, 4, 84, 84), dtype=torch.uint8)
    fractions = gap.dormant_fractions(net, x, tau=0.001)
    assert fractions["psi"] == 100 / 512
    assert 0.0 <= fractions["phi"] < 0.5
