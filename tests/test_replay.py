"""The device replay against brute force on random streams with terminals and truncations.

Every frame encodes (step, env) in its pixels, so a sampled stack says exactly which steps it holds. The brute
force keeps the plain list of transitions and recomputes stacks, n-step returns, discounts, next stacks and the
set of sampleable steps from their definitions.
"""

import numpy as np
import pytest
import torch

from benchmark.scripts import load_script

gap = load_script("rainbow_impala_gap")
STACK, N_STEP, GAMMA, NUM_ENVS = 4, 3, 0.9, 2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the replay lives on the training device


def frame_of(step, env):
    code = step * NUM_ENVS + env + 1  # never 0, so a zero frame means padding
    return np.array([[code % 256, code // 256], [env + 1, 7]], np.uint8)


def random_stream(steps, seed):
    rng = np.random.default_rng(seed)
    terminated = rng.random((steps, NUM_ENVS)) < 0.15
    truncated = ~terminated & (rng.random((steps, NUM_ENVS)) < 0.1)
    rewards = rng.normal(size=(steps, NUM_ENVS)).astype(np.float32)
    actions = rng.integers(0, 6, size=(steps, NUM_ENVS))
    return dict(terminated=terminated, truncated=truncated, rewards=rewards, actions=actions)


def step_tensors(stream, t, device):
    """What the loop hands the replay at step t: every env's frame, action, reward, terminated, truncated."""
    arrays = [
        np.stack([frame_of(t, e) for e in range(NUM_ENVS)]),
        stream["actions"][t],
        stream["rewards"][t],
        stream["terminated"][t],
        stream["truncated"][t],
    ]
    return [torch.tensor(x, device=device) for x in arrays]


def fill(replay, stream, steps):
    for t in range(steps):
        replay.add(*step_tensors(stream, t, replay.device))


def expected_stack(stream, t, env):
    ends = stream["terminated"][:, env] | stream["truncated"][:, env]
    frames = []
    for back in range(STACK - 1, -1, -1):
        visible = t - back >= 0 and not ends[max(t - back, 0) : t].any()
        frames.append(frame_of(t - back, env) if visible else np.zeros((2, 2), np.uint8))
    return np.stack(frames)


def expected_transition(stream, t, env):
    ends = stream["terminated"][:, env] | stream["truncated"][:, env]
    ret, discount = 0.0, 1.0
    for k in range(N_STEP):
        ret += discount * stream["rewards"][t + k, env]
        discount *= GAMMA
        if ends[t + k]:
            return ret, 0.0
    return ret, discount


def sampleable(stream, t, env, adds, capacity):
    """Written with its whole n-step future, history not overwritten, and no truncation inside the window."""
    if not (adds - capacity + STACK - 1 <= t <= adds - 1 - N_STEP and t >= 0):
        return False
    for k in range(N_STEP):
        if stream["terminated"][t + k, env]:
            return True
        if stream["truncated"][t + k, env]:
            return False
    return True


def decode(index, adds, capacity):
    env, slot = divmod(index, capacity)
    newest = adds - 1 - (adds - 1 - slot) % capacity  # the latest step written to this slot
    return newest, env


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [6, 11, 25, 40])
def test_samples_match_brute_force(steps, device):
    capacity = 12
    stream = random_stream(steps + 1, seed=steps)
    replay = gap.DeviceReplay(capacity * NUM_ENVS, NUM_ENVS, 2, STACK, N_STEP, GAMMA, torch.device(device))
    fill(replay, stream, steps)
    valid = {(t, e) for e in range(NUM_ENVS) for t in range(steps) if sampleable(stream, t, e, steps, capacity)}
    assert valid, "the stream should leave something to sample"
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        batch = {key: value.cpu() for key, value in replay.sample(32).items()}
        for i, index in enumerate(batch["index"].tolist()):
            t, env = decode(index, steps, capacity)
            assert (t, env) in valid, f"sampled step {t} of env {env}, which must not be sampled"
            seen.add((t, env))
            np.testing.assert_array_equal(batch["obs"][i].numpy(), expected_stack(stream, t, env))
            assert batch["actions"][i].item() == stream["actions"][t, env]
            ret, discount = expected_transition(stream, t, env)
            assert batch["returns"][i].item() == pytest.approx(ret, abs=1e-5)
            assert batch["discounts"][i].item() == pytest.approx(discount, abs=1e-6)
            if discount > 0:
                np.testing.assert_array_equal(batch["next_obs"][i].numpy(), expected_stack(stream, t + N_STEP, env))
    assert seen == valid  # with equal priorities every sampleable step turns up


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [8, 12, 60])
def test_batched_writes_equal_writes_one_step_at_a_time(capacity, device):
    """flush() writes many held-back steps at once; every tensor must equal writing them one at a time, across
    ring wrap-arounds, for any chunking (the loop flushes before each update, so chunks follow the replay ratio)."""
    steps = 5 * capacity
    stream = random_stream(steps, seed=capacity)
    one_at_a_time, batched = (
        gap.DeviceReplay(capacity * NUM_ENVS, NUM_ENVS, 2, STACK, N_STEP, GAMMA, torch.device(device)) for _ in range(2)
    )
    rng = np.random.default_rng(capacity)
    for replay in (one_at_a_time, batched):
        replay.max_priority.fill_(2.5)  # not the initial 1, so a slot left unset would show
    for t in range(steps):
        for replay in (one_at_a_time, batched):
            replay.add(*step_tensors(stream, t, device))
        one_at_a_time.flush()
        if rng.random() < 0.15:  # the batched replay also flushes by itself at max_staged steps
            batched.flush()
        if t % 23 == 22 or t == steps - 1:
            for replay in (one_at_a_time, batched):
                replay.flush()
            for name in ["frames", "actions", "rewards", "terminal", "episode_end", "priorities"]:
                torch.testing.assert_close(
                    getattr(batched, name),
                    getattr(one_at_a_time, name),
                    rtol=0,
                    atol=0,
                    msg=lambda m: f"{name} after step {t}: {m}",
                )
            assert (batched.cursor, batched.adds) == (one_at_a_time.cursor, one_at_a_time.adds)
    assert batched.max_staged == min(32, capacity - N_STEP - STACK)


@pytest.mark.parametrize("device", DEVICES)
def test_prioritized_sampling_frequencies_and_probabilities(device):
    capacity, steps = 300, 700
    stream = random_stream(steps, seed=1)
    replay = gap.DeviceReplay(capacity * NUM_ENVS, NUM_ENVS, 2, STACK, N_STEP, GAMMA, torch.device(device))
    fill(replay, stream, steps)
    replay.flush()
    valid = torch.nonzero(replay.priorities > 0).squeeze(1)
    generator = np.random.default_rng(2)
    new_priorities = torch.tensor(generator.uniform(0.05, 3.0, size=len(valid)), dtype=torch.float32, device=device)
    replay.update_priorities(valid, new_priorities)
    expected = torch.zeros_like(replay.priorities, dtype=torch.float64)
    expected[valid] = new_priorities.double() / new_priorities.double().sum()
    expected = expected.cpu()

    torch.manual_seed(0)
    counts = torch.zeros_like(expected)
    draws = 0
    for _ in range(200):
        batch = {key: value.cpu() for key, value in replay.sample(500).items()}
        counts += torch.bincount(batch["index"], minlength=len(counts)).double()
        torch.testing.assert_close(batch["probs"].double(), expected[batch["index"]], rtol=1e-5, atol=1e-9)
        draws += 500
    frequencies = counts / draws
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-4
    assert ((frequencies - expected).abs() <= bound).all()
    assert counts[replay.priorities.cpu() == 0].sum() == 0

    assert replay.max_priority.item() == pytest.approx(new_priorities.max().item())
    fill_more = random_stream(N_STEP + 2, seed=3)
    fill_more["terminated"][:] = False
    fill_more["truncated"][:] = False
    fill(replay, fill_more, N_STEP + 2)
    replay.flush()
    newest_complete = replay.env_offset + (replay.cursor - 1 - N_STEP) % capacity
    torch.testing.assert_close(replay.priorities[newest_complete], replay.max_priority.expand(NUM_ENVS))


@pytest.mark.parametrize("device", DEVICES)
def test_acting_stack_matches_replay_stack(device):
    """The stack the agent acts on (advance_stack) and the one replay rebuilds agree with brute force."""
    steps, capacity = 30, 50
    stream = random_stream(steps, seed=4)
    replay = gap.DeviceReplay(capacity * NUM_ENVS, NUM_ENVS, 2, STACK, N_STEP, GAMMA, torch.device(device))
    obs = torch.zeros(NUM_ENVS, STACK, 2, 2, dtype=torch.uint8, device=device)
    obs[:, -1] = torch.tensor(np.stack([frame_of(0, e) for e in range(NUM_ENVS)]))
    for t in range(steps - 1):
        expected = torch.tensor(np.stack([expected_stack(stream, t, e) for e in range(NUM_ENVS)]), device=device)
        torch.testing.assert_close(obs, expected)
        step = [stream[key][t] for key in ("actions", "rewards", "terminated", "truncated")]
        replay.add(obs[:, -1], *[torch.tensor(x, device=device) for x in step])
        replay.flush()
        torch.testing.assert_close(replay._stacks(replay.env_offset + t), expected)
        ended = torch.tensor(stream["terminated"][t] | stream["truncated"][t], device=device)
        frames = torch.tensor(np.stack([frame_of(t + 1, e) for e in range(NUM_ENVS)]), device=device)
        obs = gap.advance_stack(obs, frames, ended)
