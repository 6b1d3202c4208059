"""DER (data-efficient Rainbow) on Atari 100k, with a global-average-pooled bottleneck (Nature CNN encoder by default).

Paper: Sokar & Castro (2025), "Mind the GAP! The Challenges of Scale in Pixel-based Deep RL", Section 4
("Generalization to other domains", Figure 11, bottom): GAP's gains with scale hold for DER on Atari 100k.
The value network has the flagship's form (rainbow_impala_gap.py), Q(x, .) = psi(pool(phi(x))):

  phi   the Nature CNN (Mnih et al. 2015; 32, 64, 64 channels, 'SAME' padding, Xavier-uniform kernels, as labs/moes
        RainbowCNNet) or, with `--encoder impala`, the Impala ResNet (Espeholt et al. 2018); output F in R^{H x W x C}
  pool  the bottleneck: `flatten` (baseline, H*W*C inputs to psi), `gap` (Section 4, equation 1:
        g^c = 1/(H*W) sum_ij F^c_ij, C inputs) or `max` (global max pooling, Appendix B.1)
  psi   NoisyLinear(d, 512*scale) -> ReLU [-> dense -> ReLU]*extra -> dueling C51 heads (noisy)

The paper does not name DER's encoder; the default follows Dopamine's `labs/moes/configs/DER.gin`
(`FullRainbowMoENetwork.encoder_type = 'CNN'`). Dopamine's DER baseline (`moe_type = 'BASELINE'`) flattens phi's
output: `--pooling flatten --scale 1` with the default encoder reproduces its network; the default `--pooling gap` is
the paper's method.

The agent is `labs/moes/configs/DER.gin` (DER of van Hasselt et al. 2019; the paper's Table 1): full Rainbow with
noisy nets (factorised Gaussian noise drawn per sample, mu ~ U(+-1/sqrt(fan_in)), sigma = 0.1/sqrt(fan_in)), dueling
heads and double DQN; C51 (51 atoms on [-10, 10]), 10-step returns, gamma 0.99, prioritized replay as in the
flagship, Adam(1e-4, eps 1.5e-4), batch 32, one update per agent step, target sync every 2000 steps, 1600 steps
before learning, no epsilon exploration in training (the noise explores), 100k agent steps in 10 iterations of 10k.
Environment, as Dopamine's AtariPreprocessing and `atari_100k_runner.py`: no sticky actions; a lost life is terminal
for learning and restarts the frame stack (zeros but the newest frame) while the game goes on; each reset takes n
no-op agent steps (action 0, frame_skip frames each), n uniform in {0, ..., noop_max - 1}; frame skip 4 with a max
over the last two frames, 84x84 grayscale, stack of 4, 108k-frame (27k-step) episodes; rewards clipped to [-1, 1]
for learning only.
After each iteration (the last one is the end of training) the agent is evaluated on 100 games, epsilon 0.001,
noise off, as one batch of 100 parallel envs that each play one game (so short games are not over-counted; the envs
whose game ended are stepped no more). The evaluation envs are made like the training envs, as in Dopamine: no-op
starts, and a lost life restarts the frame stack while the game and its return go on until the game is over.
summary.json adds `eval_by_iteration`, `eval_return` (the final evaluation, the score Atari 100k reports) and
`human_normalized_score` ((score - random) / (human - random)).

The 26 games of Atari 100k (Kaiser et al. 2020), accepted by name (`--env-id Pong`) or as `Pong-v5`/`ALE/Pong-v5`:
Alien, Amidar, Assault, Asterix, BankHeist, BattleZone, Boxing, Breakout, ChopperCommand, CrazyClimber, DemonAttack,
Freeway, Frostbite, Gopher, Hero, Jamesbond, Kangaroo, Krull, KungFuMaster, MsPacman, Pong, PrivateEye, Qbert,
RoadRunner, Seaquest, UpNDown.

The replay, the loop, checkpoints (`--checkpoint-every`, atomic; `--resume RUN_DIR`), exit codes (BAD_INPUT 2,
DIVERGED 3, PREEMPTED 75 after SIGTERM or SIGUSR1), `--compile` and `--cudagraphs` are the flagship's.

Deviations from Dopamine, all small: each noisy layer draws its own noise (Dopamine hands one key to every layer, so
its same-shaped layers share draws); envpool takes one no-op frame of its own at every reset before the drawn no-op
steps (its noop_max=0 crashes); the episode cap counts frames from the reset, no-ops included (Dopamine's runner
counts 27k agent steps after them; since late 2024 its ALE also ends games at 100k frames from the reset); a lost life
ends the frame skip early in Dopamine, not here (the rest of the 4 frames are played); the replay holds 100k
transitions by default (Dopamine's 1M is "a proxy for unbounded": both keep the whole run); the gymnasium backend
resizes with torch's area interpolation, not OpenCV's; stratified sampling searches block sums instead of a sum tree
(same distribution); episode starts are zero-padded by masking, not by stored zero frames; a step's updates are queued
before its env step (so the device trains while the host steps the envs); they sample the transitions up to the
previous step, as Dopamine's do, but Dopamine updates before it acts, so acting here uses weights one update older
than Dopamine's.
"""

import ctypes
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    tf32: bool = False
    """allow TF32 in CUDA matmuls and convolutions (faster, less precise; the paper ran in float32)"""
    cuda: bool = True
    """use CUDA when available (`--no-cuda` forces the CPU)"""
    compile: bool = False
    """torch.compile the gradient update and the action selection"""
    cudagraphs: bool = False
    """capture the gradient update (optimizer step included) and the action selection in CUDA graphs"""
    output_dir: str = "runs"
    """where run folders go"""
    save_model: bool = False
    """save the online network's weights and the args in the run folder at the end"""
    checkpoint_every: int = 10_000
    """agent steps between checkpoints in the run folder (default: every iteration; 0: none)"""
    checkpoint_replay: bool = True
    """include the replay in checkpoints (`--no-checkpoint-replay`: smaller; a resumed run refills it first)"""
    resume: Optional[str] = None
    """a run folder to continue from its latest complete checkpoint (same script and experiment args)"""

    # environment
    env_id: str = "Pong"
    """the game: one of the 26 of Atari 100k by name (`Pong`), envpool's `Pong-v5`, gymnasium's `ALE/Pong-v5`, or
    (gymnasium backend) any pixel env, `module:Name-v0` included"""
    env_backend: Literal["envpool", "gymnasium"] = "envpool"
    """envpool (fast, Atari only) or gymnasium (ale-py, or any gymnasium env with uint8 image observations)"""
    num_envs: int = 1
    """environments acting in parallel; updates per agent step stay the same"""
    frame_size: int = 84
    """frames are resized to frame_size x frame_size grayscale"""
    frame_stack: int = 4
    """frames stacked into one observation"""
    frame_skip: int = 4
    """ALE frames per agent step (the max over the last two is observed); non-ALE envs step once"""
    sticky_action_prob: float = 0.0
    """ALE sticky actions (repeat_action_probability; Atari 100k uses none)"""
    max_episode_frames: int = 108_000
    """ALE episodes are truncated after this many frames (27k agent steps)"""
    noop_max: int = 30
    """each reset takes n no-op agent steps (frame_skip frames each), n uniform in {0, ..., noop_max - 1} (Dopamine's
    max_noops; 0: none; ALE games)"""
    terminal_on_life_loss: bool = True
    """a lost life ends the episode for learning (terminal) and restarts the frame stack, in training and evaluation,
    while the game goes on"""

    # network
    encoder: Literal["impala", "nature"] = "nature"
    """phi: the Nature CNN of Mnih et al. (2015), labs/moes DER.gin's `encoder_type = 'CNN'` (the paper does not name
    DER's encoder), or the Impala ResNet (16, 32, 32 channels)"""
    encoder_scale: float = 1.0
    """width multiplier of phi's channels"""
    encoder_blocks: int = 2
    """residual blocks in each of the three Impala stacks (labs/moes `ImpalaEncoder.num_blocks`; 3 adds one to each)"""
    encoder_extra_blocks: int = 0
    """residual blocks added to the last Impala stack only (Figure 4's deeper phi: the paper adds 4, or 2 in Appendix)"""
    pooling: Literal["flatten", "gap", "max"] = "gap"
    """the bottleneck: flatten (baseline), global average pooling (eq. 1) or global max pooling"""
    scale: int = 1
    """width multiplier of psi: hidden layers have 512*scale units (1, 2, 4, 8 in the paper)"""
    extra_dense_layers: int = 0
    """extra hidden layers in psi after its first (Figure 8's depth): as labs/moes `use_extra_linear_layer`, 512 wide,
    plain (not noisy), Xavier-initialised"""
    extra_dense_scaled: bool = False
    """make the extra layers as wide as psi's first (512*scale) and noisy like it, instead of labs/moes's layer"""
    layer_norm: bool = False
    """LayerNorm before each ReLU of psi (the algorithmic baseline of Figure 10)"""
    dueling: bool = True
    """dueling heads (labs/moes full_rainbow.gin; `--no-dueling --no-noisy --no-double-dqn` give rainbow.gin's agent)"""
    noisy: bool = True
    """noisy layers in psi and the heads, noise drawn per sample; training epsilon is then zero (labs/moes)"""
    double_dqn: bool = True
    """select the next action with the online network, evaluate it with the target network (labs/moes)"""

    # algorithm
    total_timesteps: int = 100_000
    """agent steps in total (x frame_skip = frames; Atari 100k: 100k steps = 400k frames)"""
    iteration_steps: int = 10_000
    """agent steps per iteration; each ends with an evaluation"""
    learning_rate: float = 1e-4
    """Adam's learning rate"""
    adam_eps: float = 1.5e-4
    """Adam's epsilon"""
    weight_decay: float = 0.0
    """decoupled weight decay (AdamW), an algorithmic baseline of Figure 10"""
    buffer_size: int = 100_000
    """replay capacity in transitions (the default keeps the whole 100k-step run)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 10
    """n of the n-step returns"""
    num_atoms: int = 51
    """atoms of the C51 distribution"""
    v_max: float = 10.0
    """the support is [-v_max, v_max]"""
    batch_size: int = 32
    """transitions per gradient update"""
    train_frequency: float = 1
    """agent steps per gradient update: the replay ratio is 1/train_frequency (0.5: the paper's replay ratio 2)"""
    target_network_frequency: int = 2000
    """agent steps between hard target-network updates"""
    learning_starts: int = 1600
    """agent steps before learning starts"""
    end_e: float = 0.01
    """final exploration epsilon (without --noisy; with it, training epsilon is zero, as in Dopamine)"""
    epsilon_decay_steps: int = 2000
    """agent steps over which epsilon decays linearly to end_e, counted from learning_starts"""
    eval_epsilon: float = 0.001
    """epsilon during evaluation (noisy layers then use their mean weights)"""
    eval_episodes: int = 100
    """episodes evaluated after each iteration, in parallel envs (0: none; Atari 100k reports the final one)"""

    # diagnostics and logging
    diagnostics_every: int = 10_000
    """agent steps between the paper's diagnostics (dormant neurons, bottleneck feature norm)"""
    diagnostics_batch_size: int = 256
    """size of the fixed replay batch the diagnostics are measured on"""
    dormant_tau: float = 0.001
    """a neuron is dormant when its normalised mean activation is at most tau (Sokar et al. 2023)"""
    log_every: int = 1000
    """agent steps between reads of the device-side loss statistics"""
    progress_seconds: float = 10.0
    """seconds between progress lines"""
    capture_video: bool = False
    """save one episode of each evaluation as an animated GIF, videos/eval_step{step}.gif in the run folder, and in
    TensorBoard's images (`eval/video`): the frames the agent sees, at most VIDEO_MAX_FRAMES (3,000); with
    --eval-episodes 0, one episode played as evaluation plays, at the end"""


# Network: phi (encoder) -> bottleneck pooling -> psi (dense layers)
def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow/flax 'SAME' padding (extra row/column at the bottom/right), as Dopamine's networks use."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def lecun_normal_(weight: torch.Tensor):
    """flax's default kernel initialiser: truncated normal at 2 std, variance 1/fan_in."""
    std = (weight[0].numel() ** -0.5) / 0.87962566103423978  # the truncation shrinks the std by this factor
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.relu0, self.conv0 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.conv1 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv0, self.conv1):  # flax's default, as in Dopamine's Stack
            lecun_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))


class ImpalaStack(nn.Module):
    def __init__(self, in_channels: int, channels: int, blocks: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])

    def forward(self, x):
        x = F.max_pool2d(pad_same(self.conv(x), 3, 2, float("-inf")), 3, 2)
        return self.blocks(x)


class ImpalaEncoder(nn.Module):
    def __init__(self, in_channels: int, scale: float, blocks_per_stack: int = 2, extra_blocks: int = 0):
        super().__init__()
        widths = [max(1, round(c * scale)) for c in (16, 32, 32)]
        blocks = [blocks_per_stack, blocks_per_stack, blocks_per_stack + extra_blocks]  # phi's output keeps its shape
        self.stacks = nn.Sequential(*[ImpalaStack(i, o, b) for i, o, b in zip([in_channels] + widths[:-1], widths, blocks)])
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.stacks(x))


class NatureEncoder(nn.Module):
    def __init__(self, in_channels: int, scale: float):
        super().__init__()
        c1, c2 = max(1, round(32 * scale)), max(1, round(64 * scale))
        self.specs = [(8, 4), (4, 2), (3, 1)]
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, c1, 8, 4), nn.Conv2d(c1, c2, 4, 2), nn.Conv2d(c2, c2, 3, 1)])
        self.relus = nn.ModuleList([nn.ReLU() for _ in self.convs])
        for conv in self.convs:  # labs/moes RainbowCNNet: Xavier-uniform kernels, zero biases
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        for (kernel, stride), conv, relu in zip(self.specs, self.convs, self.relus):
            x = relu(conv(pad_same(x, kernel, stride)))
        return x


class Bottleneck(nn.Module):
    """How phi's H x W x C output reaches psi: flattened (H*W*C) or pooled over H x W (C)."""

    def __init__(self, pooling: str):
        super().__init__()
        self.pooling = pooling

    def forward(self, features):
        if self.pooling == "gap":
            return features.mean(dim=(2, 3))
        if self.pooling == "max":
            return features.amax(dim=(2, 3))
        return features.flatten(1)


class NoisyLinear(nn.Module):
    """Factorised Gaussian noisy layer (Fortunato et al. 2018, eqs. 10-11) with Dopamine's initialisation, its noise
    drawn per sample. Row r of a batch sees the weights W + sigma_W * outer(eps_out[r], eps_in[r]) and the bias
    b + sigma_b * eps_out[r], with eps = f(N(0, 1)), f(e) = sign(e) sqrt(|e|). Its output is computed as

        y = W x + b + eps_out * (sigma_W (eps_in * x) + sigma_b)

    two matmuls, never the perturbed weight matrix. `noise` maps each noisy layer's name to its (eps_in, eps_out),
    one row per sample or one row shared by the batch; without it the layer uses its mean weights (evaluation)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound, sigma = in_features**-0.5, 0.1 * in_features**-0.5
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), sigma))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), sigma))
        self.in_features, self.out_features = in_features, out_features
        self.name = ""  # the key of its noise, set by QNetwork to the layer's name in the network

    def sample_noise(self, rows: int):
        """(eps_in, eps_out) of shapes (rows, in) and (rows, out): f(N(0, 1)), f(e) = sign(e) sqrt(|e|)."""

        def scaled(shape):
            e = torch.randn(shape, device=self.weight.device)
            return e.sign() * e.abs().sqrt()

        eps_in = scaled((rows, self.in_features))
        eps_out = scaled((rows, self.out_features))
        return eps_in, eps_out

    def forward(self, x, noise: Optional[dict] = None):
        mean = F.linear(x, self.weight, self.bias)
        if not noise:
            return mean
        eps_in, eps_out = noise[self.name]
        return mean + eps_out * F.linear(x * eps_in, self.weight_sigma, self.bias_sigma)


class Linear(nn.Linear):
    """A plain dense layer with Xavier-uniform weights (flax's Dense as Dopamine uses it); it has no noise to take."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x, noise: Optional[dict] = None):
        return super().forward(x)


def dense(in_features: int, out_features: int, noisy: bool) -> nn.Module:
    return NoisyLinear(in_features, out_features) if noisy else Linear(in_features, out_features)


class Psi(nn.Module):
    """psi's hidden layers: the bottleneck layer, then the extra layers, each dense -> [LayerNorm] -> ReLU."""

    def __init__(self, in_features: int, args: Args):
        super().__init__()
        width = 512 * args.scale
        extra_width = width if args.extra_dense_scaled else 512
        self.widths = [width] + [extra_width] * args.extra_dense_layers
        self.layers = nn.ModuleList([dense(in_features, width, args.noisy)])
        for _ in range(args.extra_dense_layers):
            self.layers.append(dense(self.layers[-1].weight.shape[0], extra_width, args.noisy and args.extra_dense_scaled))
        norms = [nn.LayerNorm(w) if args.layer_norm else nn.Identity() for w in self.widths]
        self.norms = nn.ModuleList(norms)
        self.relus = nn.ModuleList([nn.ReLU() for _ in self.widths])  # one each, so dormant counting sees each layer

    def forward(self, x, noise: Optional[dict] = None):
        for layer, norm, relu in zip(self.layers, self.norms, self.relus):
            x = relu(norm(layer(x, noise)))
        return x


class QNetwork(nn.Module):
    """psi(pool(phi(x))) returning C51 logits of shape (batch, actions, atoms)."""

    def __init__(self, num_actions: int, args: Args):
        super().__init__()
        self.num_actions, self.num_atoms, self.dueling = num_actions, args.num_atoms, args.dueling
        if args.encoder == "impala":
            self.phi = ImpalaEncoder(args.frame_stack, args.encoder_scale, args.encoder_blocks, args.encoder_extra_blocks)
        else:
            self.phi = NatureEncoder(args.frame_stack, args.encoder_scale)
        self.pool = Bottleneck(args.pooling)
        with torch.no_grad():
            self.feature_shape = tuple(self.phi(torch.zeros(1, args.frame_stack, args.frame_size, args.frame_size)).shape[1:])
        bottleneck_inputs = self.pool(torch.zeros(1, *self.feature_shape)).shape[1]
        width = 512 * args.scale
        self.psi = Psi(bottleneck_inputs, args)
        self.bottleneck = self.psi.layers[0]  # the weights joining phi's (pooled) output to psi
        self.head = dense(self.psi.widths[-1], num_actions * args.num_atoms, args.noisy)
        self.value_head = dense(self.psi.widths[-1], args.num_atoms, args.noisy) if args.dueling else None
        self.register_buffer("support", torch.linspace(-args.v_max, args.v_max, args.num_atoms))
        for name, module in self.named_modules():
            if isinstance(module, NoisyLinear):
                module.name = name
        c, h, w = self.feature_shape
        self.description = f"{args.encoder} phi -> {h}x{w}x{c} -> {args.pooling} -> {bottleneck_inputs} -> psi {width}"

    def sample_noise(self, rows: int) -> dict:
        """Fresh noise for every noisy layer: `rows` rows (one per sample, or one shared by the batch); {} if none."""
        noise = {}
        for module in self.modules():
            if isinstance(module, NoisyLinear):
                noise[module.name] = module.sample_noise(rows)
        return noise

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.phi(x.float() / 255.0))

    def forward(self, x: torch.Tensor, noise: Optional[dict] = None) -> torch.Tensor:
        """C51 logits; `noise` from sample_noise() perturbs the noisy layers, None uses their mean weights."""
        hidden = self.psi(self.bottleneck_features(x), noise)
        logits = self.head(hidden, noise).view(-1, self.num_actions, self.num_atoms)
        if self.dueling:
            logits = self.value_head(hidden, noise).unsqueeze(1) + logits - logits.mean(dim=1, keepdim=True)
        return logits

    def q_values(self, x: torch.Tensor, noise: Optional[dict] = None) -> torch.Tensor:
        return (self.forward(x, noise).softmax(-1) * self.support).sum(-1)


def project_distribution(target_support: torch.Tensor, probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """C51 projection of `probs` on `target_support` (batch, atoms) onto the fixed `support` (Dopamine's form)."""
    delta = support[1] - support[0]
    clipped = target_support.clamp(support[0], support[-1])
    weights = (1.0 - (clipped.unsqueeze(1) - support.view(1, -1, 1)).abs() / delta).clamp(0.0, 1.0)
    return (weights * probs.unsqueeze(1)).sum(-1)


def linear_schedule(step: int, learning_starts: int, decay_steps: int, end_e: float) -> float:
    """Dopamine's linearly_decaying_epsilon: 1 until learning starts, then linear to end_e."""
    steps_left = decay_steps + learning_starts - step
    return end_e + min(max((1.0 - end_e) * steps_left / decay_steps, 0.0), 1.0 - end_e)


@torch.no_grad()
def dormant_fractions(net: QNetwork, obs: torch.Tensor, tau: float) -> dict:
    """Fraction of dormant neurons in phi and psi (Sokar et al. 2023): a unit (channel for convs) is dormant when
    its mean |activation| over the batch, divided by its layer's average, is at most tau. Noisy layers use their
    mean weights."""
    activations = {"phi": [], "psi": []}
    hooks = []
    for part in ("phi", "psi"):
        for module in getattr(net, part).modules():
            if isinstance(module, nn.ReLU):  # each hook keeps its layer's output when net(obs) runs
                hooks.append(module.register_forward_hook(lambda m, i, o, part=part: activations[part].append(o)))
    net(obs)
    for hook in hooks:
        hook.remove()
    result = {}
    for part, outputs in activations.items():
        scores = [o.abs().mean(dim=(0, 2, 3)) if o.dim() == 4 else o.abs().mean(dim=0) for o in outputs]
        dormant = [(score / (score.mean() + 1e-9) <= tau) for score in scores]  # normalised per layer
        result[part] = float(sum(d.sum() for d in dormant)) / max(sum(d.numel() for d in dormant), 1)
    return result


def parameter_counts(net: QNetwork) -> dict:
    """All parameters, the bottleneck's weights, and the weights of psi with its heads (Figure 5, right)."""
    psi_weights = 0
    for layers in (net.psi, net.head, net.value_head):
        if layers is not None:
            for name, parameter in layers.named_parameters():
                if name.split(".")[-1] == "weight":  # not the noise scales (weight_sigma)
                    psi_weights += parameter.numel()
    total = sum(parameter.numel() for parameter in net.parameters())
    return dict(params_total=total, params_bottleneck=net.bottleneck.weight.numel(), params_psi=psi_weights)


def log_diagnostics(net: QNetwork, replay, loop, args: Args, writer: SummaryWriter):
    """The paper's diagnostics on one replay batch, drawn once so that the curves compare the network with itself."""
    if loop.diagnostics_obs is None:
        loop.diagnostics_obs = replay.sample(args.diagnostics_batch_size)["obs"]
    dormant = dormant_fractions(net, loop.diagnostics_obs, args.dormant_tau)
    with torch.no_grad():
        feature_norm = net.bottleneck_features(loop.diagnostics_obs).norm(dim=1).mean().item()
    writer.add_scalar("diagnostics/dormant_fraction_phi", dormant["phi"], loop.global_step)
    writer.add_scalar("diagnostics/dormant_fraction_psi", dormant["psi"], loop.global_step)
    writer.add_scalar("diagnostics/bottleneck_feature_norm", feature_norm, loop.global_step)


# CUDA graphs (--cudagraphs, class CudaGraphed below) replay the captured update and action selection without Python,
# which sets three rules for the code they run:
#  1. every tensor they read or write keeps its address: the replay's buffers and max priority, the optimizer's state
#     (capturable Adam) and the networks' parameters change only in place (copy_, out=, load_state_dict);
#  2. a captured update cannot call Python, so the loop flushes the replay's held-back writes before queueing updates;
#  3. the captured action selection returns the same output tensor every call: whoever keeps its actions copies them.


# Replay on the device: each env owns a circular stream of `capacity` slots; slot t holds the frame seen at t,
# the action taken, the clipped reward, and whether the episode ended (terminal or truncated) at t.
class DeviceReplay:
    block = 1024  # prioritized sampling searches block sums, then one block

    @staticmethod
    def bytes_needed(buffer_size: int, frame_size: int) -> int:
        return buffer_size * (frame_size * frame_size + 4 + 4 + 1 + 1 + 4)

    def __init__(
        self, buffer_size: int, num_envs: int, frame_size: int, stack: int, n_step: int, gamma: float, device: torch.device
    ):
        self.num_envs, self.capacity = num_envs, buffer_size // num_envs
        self.stack, self.n_step, self.device = stack, n_step, device
        size = self.num_envs * self.capacity
        self.frames = torch.zeros(size, frame_size, frame_size, dtype=torch.uint8, device=device)
        self.actions = torch.zeros(size, dtype=torch.int32, device=device)
        self.rewards = torch.zeros(size, dtype=torch.float32, device=device)
        self.terminal = torch.zeros(size, dtype=torch.bool, device=device)
        # unwritten slots count as episode ends, so the stream's first stack is zero-padded
        self.episode_end = torch.ones(size, dtype=torch.bool, device=device)
        self.num_blocks = -(-size // self.block)
        self.priorities = torch.zeros(self.num_blocks * self.block, dtype=torch.float32, device=device)
        self.max_priority = torch.ones((), device=device)
        self.discounts = gamma ** torch.arange(n_step + 1, dtype=torch.float32, device=device)
        self.env_offset = torch.arange(num_envs, device=device) * self.capacity
        self.cursor, self.adds, self.staged = 0, 0, []
        # steps held back at most; fewer than the ring's free slots, so one flush never writes a slot twice
        self.max_staged = min(32, self.capacity - n_step - stack)

    def add(self, frames, actions, rewards, terminated, truncated):
        """Hand over one step for every env (tensors of shape (num_envs, ...) on the device). Steps are held back and
        written together by flush(), a few launches for many steps (on a GPU, small launches cost more than their
        work); every read (sample, state_dict, end_streams) flushes first, so what they see is the same."""
        self.staged.append((frames, actions.to(torch.int32, copy=True), rewards, terminated, truncated))  # a copy:
        self.adds += 1  # the graphed action selection reuses its output tensor
        if len(self.staged) >= self.max_staged:
            self.flush()

    def flush(self):
        """Write the held-back steps; the result equals writing them one at a time (see tests/test_replay.py)."""
        steps = len(self.staged)
        if steps == 0:
            return
        frames, actions, rewards, terminated, truncated = (
            field[0].unsqueeze(0) if steps == 1 else torch.stack(field) for field in zip(*self.staged)
        )
        self.staged = []
        offset = self.env_offset.unsqueeze(0)
        slot = offset + (self.cursor + torch.arange(steps, device=self.device).unsqueeze(1)) % self.capacity
        self.frames[slot] = frames
        self.actions[slot] = actions
        self.rewards[slot] = rewards
        self.terminal[slot] = terminated
        self.episode_end[slot] = terminated | truncated
        # each new slot and the stack - 1 after it, whose frame history now begins with a newer frame, are unsampleable
        later = (self.cursor + torch.arange(steps + self.stack - 1, device=self.device)) % self.capacity
        self.priorities[(offset + later.unsqueeze(1)).flatten()] = 0.0
        # the step written k-th completes the n-step future of the slot n_step before it, once that slot exists
        first = max(0, self.n_step - (self.adds - steps))
        if first < steps:
            back = (self.cursor - self.n_step + torch.arange(first, steps, device=self.device)) % self.capacity
            window = (back.unsqueeze(1) + torch.arange(self.n_step, device=self.device)) % self.capacity
            window = offset.unsqueeze(2) + window.unsqueeze(1)  # (steps, env, n_step)
            ends, terminal = self.episode_end[window], self.terminal[window]
            ended_before = torch.cumsum(ends.int(), 2) - ends.int() > 0
            truncated_first = (ends & ~terminal & ~ended_before).any(2)
            self.priorities[offset + back.unsqueeze(1)] = torch.where(truncated_first, 0.0, self.max_priority)
        self.cursor = (self.cursor + steps) % self.capacity

    def state_dict(self, with_contents: bool) -> dict:
        self.flush()
        if not with_contents:  # the resumed run starts from an empty replay
            return dict(max_priority=self.max_priority.cpu(), cursor=0, adds=0)
        names = ["frames", "actions", "rewards", "terminal", "episode_end", "priorities", "max_priority"]
        return dict({name: getattr(self, name).cpu() for name in names}, cursor=self.cursor, adds=self.adds)

    def load_state_dict(self, state: dict):
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                getattr(self, name).copy_(value)  # in place, so the tensors keep their (graph-captured) addresses
        self.cursor, self.adds, self.staged = state["cursor"], state["adds"], []

    def end_streams(self):
        """End every env's stream with a truncation where an episode was running (a resumed run's envs start new
        episodes): no stack or n-step window reaches across."""
        self.flush()
        if self.adds == 0:
            return
        last = self.env_offset + (self.cursor - 1) % self.capacity
        running = ~self.terminal[last]
        self.episode_end[last] = True
        window = (
            self.env_offset.unsqueeze(1) + (self.cursor - 1 - torch.arange(self.n_step, device=self.device)) % self.capacity
        )
        self.priorities[window] = torch.where(running.unsqueeze(1), 0.0, self.priorities[window])

    def _stacks(self, index: torch.Tensor) -> torch.Tensor:
        """Frame stacks ending at flat `index`, zeroing frames from before each episode's start."""
        env = index // self.capacity
        offsets = torch.arange(self.stack - 1, -1, -1, device=self.device)
        history = (index.unsqueeze(1) - env.unsqueeze(1) * self.capacity - offsets) % self.capacity
        history = history + env.unsqueeze(1) * self.capacity
        ends = self.episode_end[history[:, :-1]].int()
        blocked = torch.flip(torch.cummax(torch.flip(ends, [1]), 1).values, [1]) > 0
        visible = torch.cat([~blocked, torch.ones_like(blocked[:, :1])], 1)
        return self.frames[history] * visible[:, :, None, None]

    def sample(self, batch_size: int) -> dict:
        """Stratified prioritized sample: obs, actions, n-step returns and discounts, next obs, probabilities."""
        self.flush()  # in eager code; graph-captured updates replay without Python, so the loop flushes before them
        blocks = self.priorities.view(self.num_blocks, self.block)
        block_sums = blocks.sum(1, dtype=torch.float64)
        cumulative = block_sums.cumsum(0)
        total = cumulative[-1]
        targets = (
            (torch.arange(batch_size, device=self.device) + torch.rand(batch_size, device=self.device, dtype=torch.float64))
            / batch_size
            * total
        )
        targets = torch.minimum(targets, total * (1 - 1e-9))
        block = torch.searchsorted(cumulative, targets.unsqueeze(1), right=True).squeeze(1).clamp(max=self.num_blocks - 1)
        residual = targets - (cumulative[block] - block_sums[block])
        inner = blocks[block].double().cumsum(1)
        residual = torch.minimum(residual.clamp(min=0.0), inner[:, -1] * (1 - 1e-9))
        position = torch.searchsorted(inner, residual.unsqueeze(1), right=True).squeeze(1).clamp(max=self.block - 1)
        index = block * self.block + position

        env = index // self.capacity
        steps = torch.arange(self.n_step, device=self.device)
        window = (index.unsqueeze(1) - env.unsqueeze(1) * self.capacity + steps) % self.capacity + env.unsqueeze(
            1
        ) * self.capacity
        ends = self.episode_end[window].float()
        alive = torch.cat([torch.ones_like(ends[:, :1]), torch.cumprod(1.0 - ends, 1)[:, :-1]], 1)
        returns = (self.rewards[window] * alive * self.discounts[:-1]).sum(1)
        not_done = torch.cumprod(1.0 - ends, 1)[:, -1]
        next_index = (index - env * self.capacity + self.n_step) % self.capacity + env * self.capacity
        return dict(
            index=index,
            obs=self._stacks(index),
            actions=self.actions[index].long(),
            returns=returns,
            discounts=self.discounts[-1] * not_done,
            next_obs=self._stacks(next_index),
            probs=(self.priorities[index] / total).float(),
        )

    def update_priorities(self, index: torch.Tensor, priorities: torch.Tensor):
        self.priorities[index] = priorities
        torch.maximum(self.max_priority, priorities.max(), out=self.max_priority)  # in place: CUDA graphs keep addresses


def check_replay_fits(args: Args, device: torch.device):
    needed = DeviceReplay.bytes_needed(args.buffer_size, args.frame_size)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    where = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu (host RAM)"
    print(f"replay: {args.buffer_size:,} transitions, {needed / 1e9:.2f} GB on {where}, {free / 1e9:.1f} GB free")
    if needed > 0.9 * free:
        fail(
            f"the replay needs {needed / 1e9:.2f} GB but only {free / 1e9:.1f} GB is free on {where}; "
            f"lower --buffer-size (each transition takes {needed / args.buffer_size:.0f} bytes)"
        )


# Training
def select_actions(net: QNetwork, obs: torch.Tensor, epsilon, with_noise: bool) -> torch.Tensor:
    """Epsilon-greedy on the device (epsilon is a device scalar, so nothing waits for the host). In training the noisy
    layers draw fresh noise for each env, as each Dopamine action draws its own; evaluation uses the mean weights."""
    with torch.no_grad():
        greedy = net.q_values(obs, net.sample_noise(obs.shape[0]) if with_noise else None).argmax(1)
    random_actions = torch.randint(0, net.num_actions, greedy.shape, device=obs.device)
    return torch.where(torch.rand(greedy.shape, device=obs.device) < epsilon, random_actions, greedy)


def importance_weights(probs: torch.Tensor) -> torch.Tensor:
    """Dopamine's prioritized-replay correction: 1/sqrt(p), divided by its batch maximum."""
    weights = 1.0 / torch.sqrt(probs + 1e-10)
    return weights / weights.max()


def advance_stack(obs: torch.Tensor, frames: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """Push each env's new frame onto its stack; an env whose episode ended starts again from zeros."""
    obs = torch.roll(obs, -1, 1) * ~ended.view(-1, 1, 1, 1)
    obs[:, -1] = frames
    return obs


def c51_losses(net: QNetwork, target_net: QNetwork, batch: dict, double_dqn: bool):
    """Per-sample cross-entropy between the projected n-step target and the online distribution. Noise as labs/moes
    keys it: the online network's in the loss is drawn per sample; one draw serves the whole batch's target, and the
    same draw perturbs the online network that picks the next action (Dopamine passes both the one key)."""
    logits = net(batch["obs"], net.sample_noise(batch["obs"].shape[0]))
    chosen = logits[torch.arange(logits.shape[0], device=logits.device), batch["actions"]]
    with torch.no_grad():
        target_noise = net.sample_noise(1)
        next_probs = target_net(batch["next_obs"], target_noise).softmax(-1)
        selector = net(batch["next_obs"], target_noise).softmax(-1) if double_dqn else next_probs
        next_action = (selector * net.support).sum(-1).argmax(1)
        next_dist = next_probs[torch.arange(next_probs.shape[0], device=logits.device), next_action]
        target_support = batch["returns"].unsqueeze(1) + batch["discounts"].unsqueeze(1) * net.support
        target = project_distribution(target_support, next_dist, net.support)
    losses = -(target * chosen.log_softmax(-1)).sum(-1)
    q_taken = (chosen.detach().softmax(-1) * net.support).sum(-1)
    return losses, q_taken


def make_optimizer(net: QNetwork, args: Args) -> torch.optim.Optimizer:
    """Adam (AdamW with weight_decay 0 is Adam), the fused kernel: one launch instead of dozens on CUDA, and on a CPU
    five times faster than the per-tensor loop over a flattened bottleneck's millions of weights."""
    return torch.optim.AdamW(
        net.parameters(),
        lr=args.learning_rate,
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        fused=True,
        capturable=args.cudagraphs,
    )


def make_update(net: QNetwork, target_net: QNetwork, optimizer, replay: DeviceReplay, args: Args, stats: torch.Tensor):
    """One gradient update, all on the device: sample, weighted C51 loss, optimizer step, new priorities, and the
    running sums of loss and Q-value into `stats`."""

    def update():
        batch = replay.sample(args.batch_size)
        losses, q_taken = c51_losses(net, target_net, batch, args.double_dqn)
        loss = (losses * importance_weights(batch["probs"])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        replay.update_priorities(batch["index"], torch.sqrt(losses.detach() + 1e-10))
        stats.add_(torch.stack([losses.detach().mean(), q_taken.mean()]))

    return update


def evaluate(net: QNetwork, args: Args, device: torch.device, seed: int, video: Optional[list] = None) -> list:
    """`eval_episodes` whole games, one in each of as many parallel envs, so that short games are not over-counted;
    epsilon `eval_epsilon`, noise off. The envs are made like the training envs, as in Dopamine's runner: no-op starts,
    and a lost life restarts the frame stack (with terminal_on_life_loss) while the game and its return go on.
    Only the envs whose game goes on are stepped and shown to the network: one long game does not cost a hundred.
    `video`, a list, gets the frames the agent sees in env 0's game (at most VIDEO_MAX_FRAMES). Prints a progress
    line every `progress_seconds`: an evaluation waits for its longest game, which may run to the frame cap."""
    envs = make_env(args, num_envs=args.eval_episodes, seed=seed)
    obs = torch.zeros(args.eval_episodes, args.frame_stack, args.frame_size, args.frame_size, dtype=torch.uint8, device=device)
    obs[:, -1] = torch.as_tensor(envs.reset(), device=device)
    returns = np.zeros(args.eval_episodes)
    playing = np.arange(args.eval_episodes)  # the envs whose game goes on; row k of obs is env playing[k]'s stack
    steps = 0
    last_progress = time.time()
    while len(playing) > 0:
        if video is not None and playing[0] == 0 and len(video) < VIDEO_MAX_FRAMES:  # env 0's game
            video.append(obs[0, -1].clone().cpu())  # a copy: a view would keep the whole stack alive
        actions = select_actions(net, obs, args.eval_epsilon, with_noise=False)
        frames, rewards, terminated, truncated, life_lost = envs.step(actions.cpu().numpy(), playing)
        returns[playing] += rewards
        goes_on = ~(terminated | truncated)  # an env whose game ended is stepped no more
        restart = life_lost[goes_on] & args.terminal_on_life_loss
        obs = advance_stack(
            obs[torch.as_tensor(goes_on, device=device)],
            torch.as_tensor(frames[goes_on], device=device),
            torch.as_tensor(restart, device=device),
        )
        playing = playing[goes_on]
        steps += 1
        if time.time() - last_progress > args.progress_seconds:
            last_progress = time.time()
            print(
                f"evaluating: {args.eval_episodes - len(playing)}/{args.eval_episodes} games over after {steps:,} steps "
                f"| mean return so far {returns.mean():.1f} (the games going on included)",
                flush=True,
            )
    envs.close()
    return returns.tolist()


@dataclass
class LoopState:
    """The training loop's running state. Checkpoints store it as a dict, and a resumed run goes on from theirs."""

    global_step: int = 0
    updates: int = 0
    iteration_returns: list = field(default_factory=list)  # returns of the episodes ended in this iteration
    returns_by_iteration: list = field(default_factory=list)
    last_return: Optional[float] = None
    diagnostics_obs: Optional[torch.Tensor] = None  # the replay batch the diagnostics measure, drawn once
    wall_seconds: float = 0.0  # the run's time in its processes before this one
    resumes: int = 0
    learning_from: int = 0  # learning starts after this step: learning_starts, later when a resume refills the replay
    eval_by_iteration: list = field(default_factory=list)  # the evaluation after each iteration
    eval_returns: list = field(default_factory=list)  # the last evaluation's episode returns


@dataclass
class TrainingParts:
    """What the gradient updates need: built by make_training() for main(), the benchmarks and the tests."""

    net: QNetwork
    target_net: QNetwork
    optimizer: torch.optim.Optimizer
    replay: DeviceReplay
    stats: torch.Tensor  # running sums of the loss and of the taken actions' Q-value, on the device
    update: Callable[[], None]  # one gradient update (compiled and CUDA-graphed as asked)


def make_training(args: Args, num_actions: int, device: torch.device) -> TrainingParts:
    net = QNetwork(num_actions, args).to(device)
    target_net = QNetwork(num_actions, args).to(device)
    target_net.load_state_dict(net.state_dict())
    optimizer = make_optimizer(net, args)
    check_replay_fits(args, device)
    replay = DeviceReplay(args.buffer_size, args.num_envs, args.frame_size, args.frame_stack, args.n_step, args.gamma, device)
    stats = torch.zeros(2, device=device)
    update = accelerated(make_update(net, target_net, optimizer, replay, args, stats), args)
    return TrainingParts(net, target_net, optimizer, replay, stats, update)


def crossed(every: int, previous_step: int, step: int) -> bool:
    """Whether going from previous_step to step passed a multiple of `every`."""
    return step // every != previous_step // every


def end_iteration(loop: LoopState, writer: SummaryWriter):
    """Dopamine's iteration: the mean return of the episodes that ended in it."""
    mean_return = float(np.mean(loop.iteration_returns)) if loop.iteration_returns else None
    episodes = len(loop.iteration_returns)
    loop.returns_by_iteration.append(dict(step=loop.global_step, mean_return=mean_return, episodes=episodes))
    if mean_return is not None:
        writer.add_scalar("charts/iteration_mean_return", mean_return, loop.global_step)
    loop.iteration_returns = []


def evaluate_iteration(net: QNetwork, loop: LoopState, args: Args, device: torch.device, writer: SummaryWriter, run_dir: str):
    """The evaluation after each iteration (the last one is the end of training); returns the seconds it took."""
    evaluated_in = time.time()
    video = [] if args.capture_video else None
    loop.eval_returns = evaluate(net, args, device, seed=args.seed + 10_000 * len(loop.returns_by_iteration), video=video)
    mean_return = float(np.mean(loop.eval_returns))
    loop.eval_by_iteration.append(dict(step=loop.global_step, mean_return=mean_return, episodes=len(loop.eval_returns)))
    writer.add_scalar("eval/mean_return", mean_return, loop.global_step)
    if video:
        write_video(video, writer, run_dir, loop.global_step)
    seconds = time.time() - evaluated_in
    print(
        f"evaluation at step {loop.global_step:,}: mean return {mean_return:.2f} over {len(loop.eval_returns)} episodes "
        f"in {seconds:.0f} s",
        flush=True,
    )
    return seconds


def main(args: Args) -> dict:
    validate_args(args)
    started = time.time()
    device = seeded_device(args)
    state = read_checkpoint(args.resume, args) if args.resume else None
    loop = LoopState(**state["loop"]) if state else LoopState(learning_from=args.learning_starts)
    clock_origin = started - loop.wall_seconds  # the run's wall time counts across resumes
    envs = make_env(args, seed=args.seed + 7919 * (loop.resumes + (state is not None)))  # new seeds on resume
    run_dir = make_run_dir(args)
    parts = make_training(args, envs.num_actions, device)
    net, target_net, replay = parts.net, parts.target_net, parts.replay
    counts = parameter_counts(net)
    print(
        f"network: {net.description}; bottleneck {counts['params_bottleneck']:,} weights, {counts['params_total']:,} "
        f"parameters in all; device {device}"
    )
    if state:
        resume_training(state, parts, loop, args, run_dir, device)
        del state  # frees the checkpoint's copy of the replay
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    stop = StopSignals()
    # a resume drops the events logged after its checkpoint's step (those at that step were logged before it)
    writer = SummaryWriter(run_dir, purge_step=loop.global_step + 1 if loop.global_step else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    obs = torch.zeros(args.num_envs, args.frame_stack, args.frame_size, args.frame_size, dtype=torch.uint8, device=device)
    obs[:, -1] = torch.as_tensor(envs.reset(), device=device)
    episode_returns = np.zeros(args.num_envs)
    episode_lengths = np.zeros(args.num_envs, dtype=np.int64)
    act = accelerated(lambda obs, epsilon: select_actions(net, obs, epsilon, with_noise=True), args)
    epsilon_on_device = torch.ones((), device=device)
    epsilon = 1.0
    stats_count = 0  # updates summed in parts.stats since the last read
    rate = StepRate(loop.global_step)
    last_progress = 0.0

    while loop.global_step < args.total_timesteps:
        if args.noisy:
            epsilon = 0.0
        else:
            epsilon = linear_schedule(loop.global_step, args.learning_starts, args.epsilon_decay_steps, args.end_e)
        if epsilon >= 1.0:
            actions = torch.randint(0, envs.num_actions, (args.num_envs,), device=device)
        else:
            actions = act(obs, epsilon_on_device.fill_(epsilon))
        host_actions = actions.cpu().numpy()  # the loop's one wait for the device
        previous_step = loop.global_step
        loop.global_step += args.num_envs
        step = loop.global_step
        # Updates are queued before the env step, so the device trains while the host steps the envs. They sample
        # the transitions up to the previous step, as Dopamine's do; Dopamine updates before it acts, so its
        # actions come from weights one update newer.
        due = int(step // args.train_frequency) - int(previous_step // args.train_frequency)
        new_updates = due if step > loop.learning_from and replay.adds > args.n_step else 0  # something to sample
        if new_updates:
            replay.flush()
        for _ in range(new_updates):
            parts.update()
        loop.updates += new_updates
        stats_count += new_updates
        frames, rewards, terminated, truncated, life_lost = envs.step(host_actions)

        episode_returns += rewards
        episode_lengths += 1
        for i in np.flatnonzero(terminated | truncated):
            loop.last_return = float(episode_returns[i])
            loop.iteration_returns.append(loop.last_return)
            writer.add_scalar("charts/episodic_return", loop.last_return, step)
            writer.add_scalar("charts/episodic_length", int(episode_lengths[i]), step)
            episode_returns[i] = 0.0
            episode_lengths[i] = 0

        learning_terminal = terminated | (life_lost & args.terminal_on_life_loss)  # the game may go on
        terminated_on_device, truncated_on_device = to_device(learning_terminal, device), to_device(truncated, device)
        replay.add(obs[:, -1], actions, to_device(rewards, device).clamp(-1.0, 1.0), terminated_on_device, truncated_on_device)
        obs = advance_stack(obs, to_device(frames, device), terminated_on_device | truncated_on_device)

        if crossed(args.target_network_frequency, previous_step, step):
            target_net.load_state_dict(net.state_dict())
        checkpoint_due = args.checkpoint_every and crossed(args.checkpoint_every, previous_step, step)
        if crossed(args.log_every, previous_step, step) or checkpoint_due or stop.received:
            if stats_count:  # the only reads of device values in the loop
                log_losses(parts.stats, stats_count, writer, step, run_dir)
                stats_count = 0
            writer.add_scalar("charts/epsilon", epsilon, step)
            writer.add_scalar("charts/SPS", rate(step), step)
        if crossed(args.diagnostics_every, previous_step, step) and replay.adds > args.n_step + 1:
            log_diagnostics(net, replay, loop, args, writer)
        if crossed(args.iteration_steps, previous_step, step) or step >= args.total_timesteps:
            end_iteration(loop, writer)
            if args.eval_episodes > 0:
                rate.pause(evaluate_iteration(net, loop, args, device, writer, run_dir))  # SPS counts training time only
        if loop.updates - new_updates < 10 <= loop.updates:  # SPS counts from the 10th update (compilation is done)
            rate.restart(step)
        if time.time() - last_progress > args.progress_seconds or step >= args.total_timesteps:
            last_progress = time.time()
            print_progress(args, loop, rate(step), epsilon)
        if checkpoint_due or stop.received:  # after the stats read above: nothing diverged up to here
            loop.wall_seconds = time.time() - clock_origin
            save_checkpoint(checkpoint_path, parts, args, loop)
        if stop.received:
            exit_preempted(stop, step, run_dir, writer, envs)

    envs.close()
    stop.close()
    summary = dict(
        script=os.path.basename(__file__),
        args=asdict(args),
        env_id=args.env_id,
        seed=args.seed,
        env_steps=loop.global_step,
        frames=loop.global_step * envs.frames_per_step,
        updates=loop.updates,
        wall_seconds=time.time() - clock_origin,
        device=str(device),
        sps=rate(loop.global_step),
        **counts,
        returns_by_iteration=loop.returns_by_iteration,
        final_return=loop.returns_by_iteration[-1]["mean_return"] if loop.returns_by_iteration else None,
        eval_by_iteration=loop.eval_by_iteration,
        eval_returns=loop.eval_returns,
        eval_return=loop.eval_by_iteration[-1]["mean_return"] if loop.eval_by_iteration else None,
    )
    summary["human_normalized_score"] = human_normalized_score(args.env_id, summary["eval_return"])
    if args.capture_video and args.eval_episodes == 0:  # no evaluation: one episode played as evaluation plays
        video = []
        evaluate(
            net, replace(args, eval_episodes=1), device, seed=args.seed + 10_000 * len(loop.returns_by_iteration), video=video
        )
        write_video(video, writer, run_dir, loop.global_step)
    if args.save_model:
        torch.save({"model": net.state_dict(), "args": asdict(args)}, os.path.join(run_dir, "model.pt"))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
    print(
        f"done: {loop.global_step:,} steps, {loop.updates:,} updates in {format_seconds(summary['wall_seconds'])}; "
        f"final return {summary['final_return']}, evaluation {summary['eval_return']} (human-normalised "
        f"{summary['human_normalized_score']}); run folder {run_dir}"
    )
    summary["run_dir"] = run_dir
    return summary


# ======================================================================================================================
# Plumbing: exit codes and argument checks, the environment adapters, the CUDA-graph wrapper, checkpoint I/O and videos.
# None of it changes the method above; main() calls it.
# ======================================================================================================================
BAD_INPUT, DIVERGED, PREEMPTED = 2, 3, 75  # exit codes; 75 (EX_TEMPFAIL): checkpointed on SIGTERM/SIGUSR1, resume it


def fail(message: str, code: int = BAD_INPUT):
    """Stop with one clear line and a non-zero exit, without a traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def validate_args(args: Args):
    positive = (
        "num_envs frame_size frame_stack frame_skip max_episode_frames scale v_max encoder_scale total_timesteps "
        "iteration_steps buffer_size n_step batch_size train_frequency target_network_frequency learning_rate "
        "adam_eps diagnostics_every diagnostics_batch_size log_every"
    ).split()
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["extra_dense_layers", "learning_starts", "eval_episodes", "weight_decay", "checkpoint_every", "noop_max"]:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.num_atoms < 2 or not 0.0 <= args.gamma <= 1.0 or not 0.0 <= args.sticky_action_prob <= 1.0:
        fail("--num-atoms must be at least 2, --gamma and --sticky-action-prob within [0, 1]")
    if (
        args.encoder_extra_blocks < 0
        or args.encoder_blocks < 0
        or ((args.encoder_extra_blocks or args.encoder_blocks != 2) and args.encoder != "impala")
    ):
        fail("--encoder-blocks and --encoder-extra-blocks must not be negative, and they shape only the Impala encoder")
    if args.buffer_size // args.num_envs <= args.n_step + args.frame_stack:
        fail(
            f"--buffer-size {args.buffer_size} is too small for {args.num_envs} envs, n-step {args.n_step} "
            f"and a stack of {args.frame_stack}"
        )


# random and human scores of the 26 games (the table rliable uses), for the human-normalised score
ATARI_100K_SCORES = {
    "Alien": (227.8, 7127.7),
    "Amidar": (5.8, 1719.5),
    "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1),
    "BattleZone": (2360.0, 37187.5),
    "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5),
    "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4),
    "DemonAttack": (152.1, 1971.0),
    "Freeway": (0.0, 29.6),
    "Frostbite": (65.2, 4334.7),
    "Gopher": (257.6, 2412.5),
    "Hero": (1027.0, 30826.4),
    "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0),
    "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3),
    "MsPacman": (307.3, 6951.6),
    "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3),
    "Qbert": (163.9, 13455.0),
    "RoadRunner": (11.5, 7845.0),
    "Seaquest": (68.4, 42054.7),
    "UpNDown": (533.4, 11693.2),
}


def human_normalized_score(env_id: str, score: Optional[float]) -> Optional[float]:
    game = env_id.removeprefix("ALE/").removesuffix("-v5")
    if score is None or game not in ATARI_100K_SCORES:
        return None
    random_score, human_score = ATARI_100K_SCORES[game]
    return (score - random_score) / (human_score - random_score)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def configure_process(args: Args):
    """The process-wide settings of a run, which main() and the benchmarks make alike: numerics flags and the host
    memory allocator (which changes a CPU run's speed, never the numbers it computes)."""
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # float32 unless asked
    # Adam's moments of weights whose gradient stays zero decay into denormal floats (below 1.2e-38), which x86 CPUs
    # process many times slower: flushed to zero, a CPU update keeps its speed (CUDA is not affected)
    torch.set_flush_denormal(True)
    # glibc gives freed blocks of over 32 MB (a flattened bottleneck's gradients from scale 4 on) straight back to the
    # system and trims the heap's free top, so each CPU update faulted the same memory in again, page by page: blocks
    # up to 256 MB now stay in the heap for the next update, with up to 1 GB of it kept free (see docs/speed.md)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 256 * 2**20)
            libc.mallopt(M_TRIM_THRESHOLD, 2**30)


def seeded_device(args: Args) -> torch.device:
    """Seeds python, numpy and torch, configures the process and picks the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    configure_process(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        fail("--cudagraphs needs a CUDA device (none is available, or --no-cuda was given)")
    return device


def make_run_dir(args: Args) -> str:
    """The run folder (the resumed one, or a new one named after the env, experiment, seed and time), writable."""
    run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join(args.output_dir, run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()  # fails now, not at the first checkpoint, if unwritable
    except OSError as error:
        fail(f"cannot write to the run folder {run_dir}: {error.strerror}")
    return run_dir


class StopSignals:
    """Records SIGTERM and SIGUSR1 (Slurm's warning before preemption): the loop then checkpoints and exits with
    PREEMPTED. close() puts the handlers they replaced back."""

    def __init__(self):
        self.received = []
        self.replaced = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.replaced[sig] = signal.signal(sig, self.record)

    def record(self, received, frame):
        self.received.append(received)

    def close(self):
        for sig, handler in self.replaced.items():
            signal.signal(sig, handler)


def exit_preempted(stop: StopSignals, step: int, run_dir: str, writer: SummaryWriter, envs):
    print(
        f"{signal.Signals(stop.received[0]).name}: checkpointed step {step:,}; exiting with code {PREEMPTED}, "
        f"continue with --resume {run_dir}",
        flush=True,
    )
    writer.close()
    envs.close()
    raise SystemExit(PREEMPTED)


def log_losses(stats: torch.Tensor, count: int, writer: SummaryWriter, step: int, run_dir: str):
    """Reads the device's sums of the loss and Q-value over `count` updates, logs their means and zeroes them; a
    non-finite mean stops the run with DIVERGED."""
    loss_mean, q_mean = (stats / count).tolist()
    if not (math.isfinite(loss_mean) and math.isfinite(q_mean)):
        fail(
            f"the loss became {loss_mean} and the Q-value {q_mean} by step {step:,}; stopped, the last good checkpoint "
            f"stays in {run_dir}",
            DIVERGED,
        )
    writer.add_scalar("losses/td_loss", loss_mean, step)
    writer.add_scalar("losses/q_values", q_mean, step)
    stats.zero_()


class StepRate:
    """Agent steps per second since restart()."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int):
        self.since, self.from_step = time.time(), step

    def pause(self, seconds: float):
        """Leaves `seconds` (an evaluation's) out of the count."""
        self.since += seconds

    def __call__(self, step: int) -> float:
        return (step - self.from_step) / max(time.time() - self.since, 1e-9)


def print_progress(args: Args, loop, steps_per_second: float, epsilon: float):
    eta = (args.total_timesteps - loop.global_step) / max(steps_per_second, 1e-9)
    print(
        f"step {loop.global_step:,}/{args.total_timesteps:,} ({100 * loop.global_step / args.total_timesteps:.1f}%) "
        f"| {steps_per_second:.0f} SPS | ETA {format_seconds(eta)} | updates {loop.updates:,} | epsilon {epsilon:.3f} "
        f"| last return {loop.last_return if loop.last_return is not None else '-'}",
        flush=True,
    )


# Environments: reset() -> frames (num_envs, size, size) uint8; step(actions) -> frames, rewards, terminated,
# truncated, life_lost. An env that ends is reset at once and returns its new episode's first frame (the final frame
# is never needed: a terminal does not bootstrap and a truncated window is never sampled). A lost life does not end
# the game: the loop decides whether it is terminal for learning.
def to_gray_frame(obs: np.ndarray, size: int) -> np.ndarray:
    """An HxW or HxWxC uint8 image as a size x size grayscale uint8 frame (area interpolation)."""
    if obs.ndim == 3:
        if obs.shape[-1] >= 3:
            obs = obs[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            obs = obs[..., 0]
    if obs.shape != (size, size):
        image = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))[None, None]
        obs = F.interpolate(image, size=(size, size), mode="area")[0, 0].numpy()
    return np.asarray(np.round(obs) if obs.dtype != np.uint8 else obs).astype(np.uint8)


class EnvpoolAtari:
    """envpool's Atari envs with Dopamine's no-op starts, taken here as agent steps of action 0 (envpool's own noop_max
    counts raw frames)."""

    def __init__(self, env_id: str, num_envs: int, seed: int, args: Args):
        import envpool

        # noop_max=1: envpool 1.2.5 crashes with 0, and with 1 it takes exactly one no-op frame at each reset (the one
        # frame more than Dopamine); the drawn no-op steps follow in _noop_start
        self.envs = envpool.make(
            env_id,
            env_type="gymnasium",
            num_envs=num_envs,
            seed=seed,
            img_height=args.frame_size,
            img_width=args.frame_size,
            stack_num=1,
            gray_scale=True,
            frame_skip=args.frame_skip,
            repeat_action_probability=args.sticky_action_prob,
            noop_max=1,
            use_fire_reset=False,
            episodic_life=False,
            reward_clip=False,
            full_action_space=False,
            max_episode_steps=args.max_episode_frames // args.frame_skip,
        )
        self.num_actions = int(self.envs.action_space.n)
        self.frames_per_step = args.frame_skip
        self.noop_max, self.noop_rng = args.noop_max, np.random.default_rng(seed)
        self.terminal_on_life_loss = args.terminal_on_life_loss
        self.lives = np.zeros(num_envs)

    def _noop_start(self, i: int, frame: np.ndarray, lives: int) -> np.ndarray:
        """Env i was just reset: take n ~ uniform{0, ..., noop_max - 1} agent steps of action 0 (ALE's NOOP), as
        Dopamine's runner does; one that ends the episode (a lost life too, with terminal_on_life_loss) resets the
        game and the remaining no-ops go on. Returns the env's first frame."""
        env_id = np.array([i])
        noops = self.noop_rng.integers(0, self.noop_max) if self.noop_max > 0 else 0
        for _ in range(noops):
            obs, _, terminated, truncated, info = self.envs.step(np.zeros(1, dtype=np.int32), env_id)
            frame = obs[0, 0]
            life_lost = self.terminal_on_life_loss and info["lives"][0] < lives
            if terminated[0] or truncated[0] or life_lost:
                obs, info = self.envs.reset(env_id)
                frame = obs[0, 0]
            lives = info["lives"][0]
        self.lives[i] = lives
        return np.array(frame)

    def reset(self) -> np.ndarray:
        obs, info = self.envs.reset()
        frames = []
        for i in range(len(obs)):
            frames.append(self._noop_start(i, obs[i, 0], info["lives"][i]))
        return np.stack(frames)

    def step(self, actions: np.ndarray, env_ids: Optional[np.ndarray] = None):
        """Steps every env, or only `env_ids` (the outputs are theirs, in that order)."""
        if env_ids is None:
            env_ids = np.arange(len(self.lives))
            obs, rewards, terminated, truncated, info = self.envs.step(actions.astype(np.int32))
        else:
            obs, rewards, terminated, truncated, info = self.envs.step(actions.astype(np.int32), env_ids)
        frames = np.array(obs[:, 0])
        life_lost = (info["lives"] < self.lives[env_ids]) & ~terminated
        self.lives[env_ids] = info["lives"]
        for k in np.flatnonzero(terminated | truncated):  # envpool would reset on the next step, ignoring its action
            reset_obs, reset_info = self.envs.reset(env_ids[k : k + 1])
            frames[k] = self._noop_start(env_ids[k], reset_obs[0, 0], reset_info["lives"][0])
        return (frames, rewards.astype(np.float32), terminated.astype(bool), truncated.astype(bool), life_lost.astype(bool))

    def close(self):
        self.envs.close()


class GymnasiumPixels:
    """N gymnasium envs stepped in turn; ALE envs get Dopamine's frame skip with a max over the last two, and its
    no-op starts."""

    def __init__(self, env_id: str, num_envs: int, seed: int, args: Args, is_ale: bool):
        import gymnasium as gym

        kwargs = (
            {}
            if not is_ale
            else dict(
                frameskip=1,
                repeat_action_probability=args.sticky_action_prob,
                obs_type="grayscale",
                full_action_space=False,
                max_num_frames_per_episode=args.max_episode_frames,
            )
        )
        self.envs = [gym.make(env_id, **kwargs) for _ in range(num_envs)]
        self.skip = self.frames_per_step = args.frame_skip if is_ale else 1
        self.size, self.seed, self.num_actions = args.frame_size, seed, int(self.envs[0].action_space.n)
        self.noop_max, self.noop_rng = args.noop_max if is_ale else 0, np.random.default_rng(seed)
        self.terminal_on_life_loss = args.terminal_on_life_loss
        self.lives = np.zeros(num_envs)

    def _agent_step(self, i: int, action: int):
        """`skip` frames of `action` in env i (fewer if the game ends); observes the max over the last two frames."""
        reward, last_two = 0.0, []
        for _ in range(self.skip):
            obs, frame_reward, terminated, truncated, info = self.envs[i].step(action)
            reward += frame_reward
            last_two = [*last_two[-1:], obs]
            if terminated or truncated:
                break
        return np.maximum.reduce(last_two), reward, terminated, truncated and not terminated, info

    def _reset_one(self, i: int, seed: Optional[int] = None) -> np.ndarray:
        """Reset env i and take n ~ uniform{0, ..., noop_max - 1} agent steps of action 0 (ALE's NOOP), as Dopamine's
        runner does; one that ends the episode (a lost life too, with terminal_on_life_loss) resets the game and the
        remaining no-ops go on. Returns the env's first frame."""
        obs, info = self.envs[i].reset(seed=seed)
        lives = info.get("lives", 0)
        noops = self.noop_rng.integers(0, self.noop_max) if self.noop_max > 0 else 0
        for _ in range(noops):
            obs, _, terminated, truncated, info = self._agent_step(i, 0)
            life_lost = self.terminal_on_life_loss and info.get("lives", 0) < lives
            if terminated or truncated or life_lost:
                obs, info = self.envs[i].reset()
            lives = info.get("lives", 0)
        self.lives[i] = lives
        return to_gray_frame(obs, self.size)

    def reset(self) -> np.ndarray:
        frames = []
        for i in range(len(self.envs)):
            frames.append(self._reset_one(i, self.seed + i))
        return np.stack(frames)

    def step(self, actions: np.ndarray, env_ids: Optional[np.ndarray] = None):
        """Steps every env, or only `env_ids` (the outputs are theirs, in that order)."""
        if env_ids is None:
            env_ids = np.arange(len(self.envs))
        n = len(env_ids)
        frames, rewards = [], np.zeros(n, np.float32)
        terminated, truncated, life_lost = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        for k, i in enumerate(env_ids):
            obs, rewards[k], terminated[k], truncated[k], info = self._agent_step(i, int(actions[k]))
            life_lost[k] = info.get("lives", 0) < self.lives[i] and not terminated[k]
            self.lives[i] = info.get("lives", 0)
            if terminated[k] or truncated[k]:
                frames.append(self._reset_one(i))  # the next game's first frame
            else:
                frames.append(to_gray_frame(obs, self.size))
        return np.stack(frames), rewards, terminated, truncated, life_lost

    def close(self):
        for env in self.envs:
            env.close()


def make_env(args: Args, num_envs: Optional[int] = None, seed: Optional[int] = None):
    """The vectorised pixel environment for `args.env_id`, or one clear error line."""
    num_envs = args.num_envs if num_envs is None else num_envs
    seed = args.seed if seed is None else seed
    env_id = f"{args.env_id}-v5" if args.env_id in ATARI_100K_SCORES else args.env_id
    if args.env_backend == "envpool":
        import envpool

        if ":" in env_id:
            fail(f"'{env_id}' is a gymnasium entry point: use --env-backend gymnasium")
        env_id = env_id.removeprefix("ALE/")
        if env_id not in envpool.list_all_envs():
            fail(f"unknown env id '{args.env_id}' for envpool (Atari ids look like Pong-v5)")
        with warnings.catch_warnings():  # gymnasium warns about non-Atari specs' float64 bounds
            warnings.simplefilter("ignore")
            obs_space = envpool.make_spec(env_id).observation_space
        if len(obs_space.shape) != 3 or not env_id.endswith("-v5"):
            fail(f"'{args.env_id}' is not a pixel-based Atari env; this script needs image observations")
        return EnvpoolAtari(env_id, num_envs, seed, args)

    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    if ":" in env_id and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `module:Name` resolves from the working directory, as with `python -m`
    if ":" not in env_id and "/" not in env_id and f"ALE/{env_id}" in gym.registry:
        env_id = f"ALE/{env_id}"
    try:
        probe = gym.make(env_id)
    except Exception as error:  # gymnasium raises several types for unknown ids and modules
        fail(f"cannot make env '{args.env_id}': {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    obs_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"'{args.env_id}' has {type(action_space).__name__} actions; this script needs discrete actions")
    if not (
        isinstance(obs_space, gym.spaces.Box)
        and obs_space.dtype == np.uint8
        and (len(obs_space.shape) == 2 or (len(obs_space.shape) == 3 and obs_space.shape[-1] in (1, 3, 4)))
    ):
        fail(f"'{args.env_id}' does not give uint8 image observations (HxW or HxWxC), got {obs_space}")
    return GymnasiumPixels(env_id, num_envs, seed, args, is_ale=env_id.startswith("ALE/"))


class CudaGraphed:
    """fn(*tensors) run eagerly on a side stream for its first calls (lazy state, compilation), then captured once in
    a CUDA graph and replayed: inputs are copied into static buffers, the output is the graph's static tensor. Every
    call is a real call (capturing runs nothing)."""

    def __init__(self, fn, warmup_calls: int = 3):
        self.fn, self.warmup_calls, self.graph = fn, warmup_calls, None

    def __call__(self, *inputs):
        if self.graph is None and self.warmup_calls > 0:
            self.warmup_calls -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                output = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return output
        if self.graph is None:
            self.static_inputs, self.graph = [x.clone() for x in inputs], torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_output = self.fn(*self.static_inputs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.static_output


def accelerated(fn, args: Args):
    fn = torch.compile(fn) if args.compile else fn
    return CudaGraphed(fn) if args.cudagraphs else fn


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host to device without waiting for the work queued on the device (pinned memory, asynchronous copy)."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


# args that may change when a run is resumed; the others define the experiment and must match the checkpoint's
RUN_CONTROL_ARGS = set(
    "resume total_timesteps output_dir cuda compile cudagraphs save_model eval_episodes log_every "
    "progress_seconds checkpoint_every checkpoint_replay capture_video".split()
)


def training_state(parts: TrainingParts, args: Args, loop: LoopState) -> dict:
    """What a run needs to go on where it stands; the envs restart (see DeviceReplay.end_streams)."""
    rng = dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )
    loop_state = dict(vars(loop))  # a plain dict: checkpoints do not depend on the class
    if loop.diagnostics_obs is not None:
        loop_state["diagnostics_obs"] = loop.diagnostics_obs.cpu()
    return dict(
        script=os.path.basename(__file__),
        args=asdict(args),
        loop=loop_state,
        net=parts.net.state_dict(),
        target_net=parts.target_net.state_dict(),
        optimizer=parts.optimizer.state_dict(),
        replay=parts.replay.state_dict(args.checkpoint_replay),
        rng=rng,
    )


def restore_training_state(state: dict, parts: TrainingParts):
    parts.net.load_state_dict(state["net"])
    parts.target_net.load_state_dict(state["target_net"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.replay.load_state_dict(state["replay"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def resume_training(state: dict, parts: TrainingParts, loop: LoopState, args: Args, run_dir: str, device: torch.device):
    """main() on --resume: the checkpoint's networks, optimizer, replay and random streams, and the replay's streams
    ended where the envs restart."""
    restore_training_state(state, parts)
    parts.replay.end_streams()
    loop.resumes += 1
    if loop.diagnostics_obs is not None:
        loop.diagnostics_obs = loop.diagnostics_obs.to(device)
    if parts.replay.adds == 0 and loop.global_step > 0:
        loop.learning_from = loop.global_step + args.learning_starts
        print(f"the checkpoint holds no replay: refilling it for {args.learning_starts:,} steps before learning")
    print(f"resuming {run_dir} at step {loop.global_step:,} (resume {loop.resumes})")


def save_checkpoint(path: str, parts: TrainingParts, args: Args, loop: LoopState):
    written_in = time.time()
    write_atomically(training_state(parts, args, loop), path)
    seconds = time.time() - written_in
    print(f"checkpoint at step {loop.global_step:,}: {os.path.getsize(path) / 1e9:.2f} GB in {seconds:.1f} s", flush=True)


def write_atomically(state: dict, path: str):
    """Write, flush and fsync a temporary file, then rename it: `path` always holds a complete checkpoint."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(folder)  # makes the rename itself durable
    os.close(folder)


def read_checkpoint(run_dir: str, args: Args) -> dict:
    """The run folder's checkpoint, if this script wrote it with the same experiment args; else one clear error."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"cannot resume: no complete checkpoint in '{run_dir}' (no checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # no second replay in memory
        script, saved_args = state["script"], state["args"]
    except Exception as error:  # truncated or corrupt files fail in pickle, zipfile or torch
        fail(f"cannot resume: {path} is corrupt or truncated ({type(error).__name__})")
    if script != os.path.basename(__file__):
        fail(f"cannot resume: {path} was written by {script}, not {os.path.basename(__file__)}")
    for name, value in asdict(args).items():
        if name not in RUN_CONTROL_ARGS and saved_args.get(name) != value:
            fail(f"cannot resume: --{name.replace('_', '-')} is {saved_args.get(name)} in the checkpoint, {value} here")
    return state


VIDEO_MAX_FRAMES = 3000  # --capture-video keeps at most this many frames of an episode (a GIF of a few MB)
VIDEO_FRAME_MS = 70  # GIF frame duration: about 15 agent steps a second, as the ALE's 60 Hz with a frame skip of 4


def write_video(frames: list, writer: SummaryWriter, run_dir: str, global_step: int):
    """--capture-video: an episode's frames (H x W grayscale or 3 x H x W RGB uint8 tensors) as an animated GIF in the
    run folder's videos/ and in TensorBoard's image dashboard, which plays GIFs (the summary torch's add_video writes,
    without its moviepy). The GIF palette keeps grayscale exactly (RGB too, up to 256 colours a frame); Pillow writes
    a repeated frame once, for longer."""
    frames = [frame.permute(1, 2, 0) if frame.dim() == 3 else frame for frame in frames]  # RGB channels last
    images = [Image.fromarray(frame.numpy()) for frame in frames]
    path = os.path.join(run_dir, "videos", f"eval_step{global_step}.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=VIDEO_FRAME_MS, loop=0)
    with open(path, "rb") as f:
        image = Summary.Image(
            height=images[0].height, width=images[0].width, colorspace=len(images[0].getbands()), encoded_image_string=f.read()
        )
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), global_step)


def format_seconds(seconds: float) -> str:
    return (f"{int(seconds) // 86400}d " if seconds >= 86400 else "") + time.strftime("%H:%M:%S", time.gmtime(seconds))


if __name__ == "__main__":
    main(tyro.cli(Args))
