"""One gradient update of the flagship against its formulas, on a tiny network and a hand-built replay.

The replay holds a known stream (random frames, actions and rewards, several terminals). The update runs as the script
builds it (make_update); the test records what it drew (the sampled slots and the noise), then recomputes by brute
force, from the network before the step: frame stacks, n-step returns and discounts from the stream, the double-DQN
next action, the target network's distribution, the C51 projection (a loop over atoms), the cross-entropy, the new
priorities and the importance-weighted loss. Noise: the update's own draws are recorded and replayed into the hand
computation, so the default noisy agent is checked as it trains; the core rainbow.gin agent (no noise) is checked too.
Finally main() on Catch shows the target network syncs on agent steps, not on update counts.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmark.scripts import load_script
from tests.helpers import brute_force_projection

gap = load_script("rainbow_impala_gap")
STEPS, CAPACITY, NUM_ACTIONS, BATCH = 40, 64, 3, 8
TERMINALS = [9, 17, 24, 31]  # steps whose transition ends an episode: many sampled windows are cut short
AGENTS = {
    "full_rainbow": dict(),  # the script's default, labs/moes full_rainbow.gin: noisy, dueling, double DQN
    "core_rainbow": dict(noisy=False, dueling=False, double_dqn=False),
}  # Dopamine's rainbow.gin agent


def tiny_args(**overrides) -> "gap.Args":
    return gap.Args(frame_size=16, batch_size=BATCH, scale=1, cuda=False, **overrides)


def known_stream(args) -> SimpleNamespace:
    """One env's steps: the frame seen at t, the action taken, its reward and whether it ended the episode."""
    rng = np.random.default_rng(0)
    frames = rng.integers(1, 256, size=(STEPS, args.frame_size, args.frame_size), dtype=np.uint8)
    actions = rng.integers(0, NUM_ACTIONS, size=STEPS)
    rewards = rng.uniform(-1.0, 1.0, size=STEPS).astype(np.float32)  # as the loop stores them: clipped, float32
    terminal = np.zeros(STEPS, dtype=bool)
    terminal[TERMINALS] = True
    return SimpleNamespace(frames=frames, actions=actions, rewards=rewards, terminal=terminal)


def hand_built_replay(stream, args) -> "gap.DeviceReplay":
    """The stream written step by step, then every sampleable slot given its own priority (so the importance weights
    differ), the rest left at zero."""
    replay = gap.DeviceReplay(CAPACITY, 1, args.frame_size, args.frame_stack, args.n_step, args.gamma, torch.device("cpu"))
    for t in range(STEPS):
        replay.add(
            torch.tensor(stream.frames[t : t + 1]),
            torch.tensor(stream.actions[t : t + 1]),
            torch.tensor(stream.rewards[t : t + 1]),
            torch.tensor(stream.terminal[t : t + 1]),
            torch.zeros(1, dtype=torch.bool),
        )
    replay.flush()
    sampleable = replay.priorities > 0
    assert sampleable.sum() == STEPS - args.n_step  # every slot whose n-step future is written
    chosen = torch.tensor(np.random.default_rng(1).uniform(0.2, 2.0, size=replay.priorities.shape), dtype=torch.float32)
    replay.priorities.copy_(torch.where(sampleable, chosen, 0.0))
    return replay


def hand_stack(stream, t: int, args) -> np.ndarray:
    """Frames t-3..t; a frame is zero if it is before the stream's start or before an episode end within t-3..t-1."""
    frames = []
    for back in range(args.frame_stack - 1, -1, -1):
        s = t - back
        visible = s >= 0 and not stream.terminal[s:t].any()
        frames.append(stream.frames[s] if visible else np.zeros_like(stream.frames[0]))
    return np.stack(frames)


def hand_return(stream, t: int, args):
    """The n-step return sum_k gamma^k r_{t+k}, stopping after a terminal, and the bootstrap discount gamma^n (0 if
    the episode ended within the window)."""
    ret = 0.0
    for k in range(args.n_step):
        ret += args.gamma**k * float(stream.rewards[t + k])
        if stream.terminal[t + k]:
            return ret, 0.0
    return ret, args.gamma**args.n_step


def run_one_update(agent: dict, max_priority: float = 1.0) -> SimpleNamespace:
    """Build the parts as main() does, run one update while recording its draws, and recompute it by hand."""
    args = tiny_args(**agent)
    torch.manual_seed(0)
    net = gap.QNetwork(NUM_ACTIONS, args)
    target_net = gap.QNetwork(NUM_ACTIONS, args)  # not synced: the target must come from this other network
    net_before = copy.deepcopy(net)  # the network the update's losses are computed with
    stream = known_stream(args)
    replay = hand_built_replay(stream, args)
    replay.max_priority.fill_(max_priority)
    priorities_before = replay.priorities.clone()
    stats = torch.zeros(2)
    update = gap.make_update(net, target_net, gap.make_optimizer(net, args), replay, args, stats)

    # record what the update draws: its batch (the sampled slots) and each noise draw, in order
    drawn = SimpleNamespace(batch=None, noise=[])
    sample, sample_noise = replay.sample, net.sample_noise

    def recording_sample(batch_size):
        drawn.batch = sample(batch_size)
        return drawn.batch

    def recording_noise(rows):
        noise = sample_noise(rows)
        drawn.noise.append(noise)
        return noise

    replay.sample, net.sample_noise = recording_sample, recording_noise
    torch.manual_seed(1)  # the same sampled slots for both agents (sampling is the update's first draw)
    update()
    # labs/moes keying: per-sample noise for the loss, then one draw shared by the target and the selector
    assert len(drawn.noise) == 2
    online_noise, target_noise = drawn.noise
    for name, (eps_in, eps_out) in online_noise.items():
        assert eps_in.shape[0] == eps_out.shape[0] == BATCH, name
        assert target_noise[name][0].shape[0] == target_noise[name][1].shape[0] == 1, name

    slots = drawn.batch["index"].tolist()
    assert len(set(slots)) == BATCH  # distinct slots (with this seed), so each new priority has one sample
    obs = torch.tensor(np.stack([hand_stack(stream, t, args) for t in slots]))
    next_obs = torch.tensor(np.stack([hand_stack(stream, t + args.n_step, args) for t in slots]))
    assert torch.equal(drawn.batch["obs"], obs) and torch.equal(drawn.batch["next_obs"], next_obs)

    support = net_before.support.double().numpy()
    with torch.no_grad():
        target_probs = target_net(next_obs, target_noise).double().softmax(-1).numpy()
        selector_net = net_before if args.double_dqn else target_net  # double DQN: the online network picks
        selector_probs = selector_net(next_obs, target_noise).double().softmax(-1).numpy()
    targets, next_actions, greedy_target_actions = [], [], []
    for i, t in enumerate(slots):
        ret, discount = hand_return(stream, t, args)
        next_action = int(np.argmax(selector_probs[i] @ support))
        targets.append(brute_force_projection(ret + discount * support, target_probs[i, next_action], support))
        next_actions.append(next_action)
        greedy_target_actions.append(int(np.argmax(target_probs[i] @ support)))

    # the losses, with autograd on the network before the step (for the gradient check)
    logits = net_before(obs, online_noise).double()
    chosen = logits[torch.arange(BATCH), torch.tensor(stream.actions[slots])]
    cross_entropy = -(torch.tensor(np.stack(targets)) * chosen.log_softmax(-1)).sum(-1)
    probs = priorities_before.double()[slots] / priorities_before.double().sum()
    weights = probs**-0.5 / (probs**-0.5).max()
    (weights * cross_entropy).mean().backward()

    return SimpleNamespace(
        args=args,
        net=net,
        net_before=net_before,
        replay=replay,
        stats=stats,
        slots=slots,
        priorities_before=priorities_before,
        cross_entropy=cross_entropy.detach(),
        q_taken=(chosen.detach().softmax(-1) * net_before.support.double()).sum(-1),
        stream=stream,
        next_actions=next_actions,
        greedy_target_actions=greedy_target_actions,
    )


@pytest.mark.parametrize("agent", AGENTS.values(), ids=AGENTS.keys())
def test_new_priorities_are_sqrt_cross_entropy_on_the_sampled_slots_only(agent):
    """Each sampled slot's new priority is sqrt(CE + 1e-10) of its own sample, from the network before the step;
    every other slot keeps its priority. The network runs in float32 (it casts its input), the rest by hand in
    float64: measured relative error 5e-7."""
    run = run_one_update(agent)
    expected = torch.sqrt(run.cross_entropy + 1e-10)
    new = run.replay.priorities.double()
    torch.testing.assert_close(new[run.slots], expected, rtol=1e-5, atol=0.0)
    untouched = torch.ones(len(new), dtype=torch.bool)
    untouched[run.slots] = False
    assert torch.equal(run.replay.priorities[untouched], run.priorities_before[untouched])
    # the loss statistics the loop logs: the unweighted mean cross-entropy and the mean Q of the taken actions
    torch.testing.assert_close(
        run.stats.double(), torch.stack([run.cross_entropy.mean(), run.q_taken.mean()]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("agent", AGENTS.values(), ids=AGENTS.keys())
def test_the_batch_exercises_terminals_and_the_double_dqn_choice(agent):
    """The checks above are only as good as the batch: it holds full windows and windows cut by a terminal before
    their last step (rewards after it must not count, the discount is 0), frame stacks that an episode start cuts,
    and samples where the online network's next action is not the target network's own greedy one."""
    run = run_one_update(agent)
    discounts = [hand_return(run.stream, t, run.args)[1] for t in run.slots]
    assert run.args.gamma**run.args.n_step in discounts
    cut_early = [t for t in run.slots if run.stream.terminal[t : t + run.args.n_step - 1].any()]
    assert cut_early
    zero_padded = [t for t in run.slots if not hand_stack(run.stream, t, run.args)[0].any()]
    assert zero_padded
    if run.args.double_dqn:
        assert run.next_actions != run.greedy_target_actions


@pytest.mark.parametrize("agent", AGENTS.values(), ids=AGENTS.keys())
def test_the_loss_is_the_importance_weighted_mean(agent):
    """The gradient the optimizer stepped with (left in .grad by the update) equals the gradient of
    mean_i w_i CE_i, w_i = (1/sqrt(p_i)) / max_j (1/sqrt(p_j)), p = priority / total priority, by hand. Measured
    difference: at most 3e-6 of the largest gradient entry of a parameter."""
    run = run_one_update(agent)
    weights_differ = run.priorities_before[run.slots].unique().numel() > 1
    assert weights_differ  # else a plain mean would pass too
    for (name, script_param), hand_param in zip(run.net.named_parameters(), run.net_before.parameters()):
        scale = hand_param.grad.abs().max()
        torch.testing.assert_close(script_param.grad, hand_param.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_max_priority_is_the_running_max_of_written_priorities():
    """New transitions enter at the max priority seen: after an update it is the larger of the old max and the
    batch's new priorities."""
    run = run_one_update(AGENTS["full_rainbow"], max_priority=1.0)
    new_max = torch.sqrt(run.cross_entropy + 1e-10).max()
    assert new_max > 1.0  # so the update has to raise it
    torch.testing.assert_close(run.replay.max_priority.double(), new_max, rtol=1e-6, atol=0.0)
    high = run_one_update(AGENTS["full_rainbow"], max_priority=100.0)
    assert high.replay.max_priority.item() == 100.0  # it never goes down


def test_target_network_syncs_every_n_agent_steps_not_updates(tmp_path, monkeypatch):
    """main() on Catch, an update every 2 agent steps from step 20, a sync period of 30: the target network loads the
    online weights at agent steps 0 (its creation), 30, 60 and 90, after 0, 5, 20 and 35 updates. Counting updates
    instead would sync at step 80 (the 30th update)."""
    counts = SimpleNamespace(env_steps=0, updates=0)
    syncs = []  # (agent steps, updates) at each load_state_dict

    class RecordingQNetwork(gap.QNetwork):
        def load_state_dict(self, state_dict, *args, **kwargs):
            syncs.append((counts.env_steps, counts.updates))
            return super().load_state_dict(state_dict, *args, **kwargs)

    make_env, make_update = gap.make_env, gap.make_update

    def counting_make_env(*args, **kwargs):
        envs = make_env(*args, **kwargs)
        step = envs.step

        def counted_step(actions):
            counts.env_steps += 1  # one env: agent steps = env steps; the loop steps the env before the sync check
            return step(actions)

        envs.step = counted_step
        return envs

    def counting_make_update(*args, **kwargs):
        update = make_update(*args, **kwargs)

        def counted_update():
            counts.updates += 1
            update()

        return counted_update

    monkeypatch.setattr(gap, "QNetwork", RecordingQNetwork)
    monkeypatch.setattr(gap, "make_env", counting_make_env)
    monkeypatch.setattr(gap, "make_update", counting_make_update)
    args = gap.Args(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=16,
        total_timesteps=100,
        learning_starts=20,
        buffer_size=200,
        batch_size=8,
        train_frequency=2,
        target_network_frequency=30,
        progress_seconds=1e9,
        cuda=False,
        output_dir=str(tmp_path),
    )
    summary = gap.main(args)
    assert summary["updates"] == counts.updates == (100 - 20) // 2
    assert syncs == [(0, 0), (30, 5), (60, 20), (90, 35)]
