"""A resumed run is the run that was not interrupted: after a checkpoint is written and read back into freshly built
parts, the next updates give bitwise the same parameters, buffers (pruning masks included), optimizer state and replay
as the original parts going on. tests/test_checkpoint.py compares a saved state with the state read back, which cannot
see state that is never saved; here whatever is lost shows up in what the training does next."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmark.scripts import ALL_SCRIPTS, load_script, training_parts

NUM_ACTIONS = 3  # Catch's (toy_envs/catch.py); any number does for these updates
CASES = [(name, None) for name in ALL_SCRIPTS if name != "rainbow_pruned"]
CASES += [("rainbow_pruned", "rigl"), ("rainbow_pruned", "gradual")]  # both ways the masks change while training


def tiny_args(module, method):
    """Small and fast settings; the target network syncs and the masks change in both halves of the test."""
    overrides = dict(
        frame_size=24,
        buffer_size=600,
        batch_size=8,
        learning_rate=1e-3,
        cuda=False,
        target_network_frequency=5,
        learning_starts=0,
        total_timesteps=20,
    )
    if method is not None:
        # the schedule of a 20-step run: gradual pruning from step 1 to 16, masks updated every 2 updates
        overrides.update(method=method, sparsify="all", mask_update_every=2, rigl_update_every=2)
    return module.Args(**overrides)


def starting_loop(name, module, args):
    """The loop state main() starts with (and saves in its checkpoints, updated)."""
    loop = module.LoopState(learning_from=args.learning_starts)
    if name == "rainbow_pruned":  # the schedule's agent steps, fixed by main() when the run starts
        loop.prune_start_step, loop.prune_end_step = module.schedule_steps(args, args.total_timesteps)
    return loop


def build_parts(name, module, args, loop, seed):
    """Networks, optimizer, a filled replay and (rainbow_pruned) the pruner, from the script's make_training as main()
    builds them (rainbow_pruned's with the schedule of the loop state)."""
    torch.manual_seed(seed)
    if name == "rainbow_pruned":
        prune_steps = (loop.prune_start_step, loop.prune_end_step)
        return training_parts(module, args, torch.device("cpu"), NUM_ACTIONS, prune_steps=prune_steps)
    return training_parts(module, args, torch.device("cpu"), NUM_ACTIONS)


def play(parts, args, loop, steps):
    """`steps` agent steps as main()'s loop takes them with --train-frequency 1: the replay's held-back writes, one
    gradient update, the mask updates due after it, then the step's transition joins the replay, and the target
    network syncs every --target-network-frequency steps. The "env" is torch's random stream, so a restored random
    state replays the same transitions."""
    frame_shape = (args.num_envs, *parts.replay.frames.shape[1:])  # Procgen's frames are RGB: (3, H, W)
    for _ in range(steps):
        loop.global_step += args.num_envs
        parts.replay.flush()
        parts.update()
        loop.updates += 1
        if hasattr(parts, "pruner"):
            parts.pruner.step(loop.global_step, loop.updates - 1, loop.updates)
        frames = torch.randint(0, 256, frame_shape, dtype=torch.uint8)
        actions = torch.randint(0, NUM_ACTIONS, (args.num_envs,))
        rewards = torch.randint(-1, 2, (args.num_envs,)).float()
        terminated = torch.rand(args.num_envs) < 0.2  # a few episode ends among the new transitions
        truncated = torch.zeros(args.num_envs, dtype=torch.bool)
        parts.replay.add(frames, actions, rewards, terminated, truncated)
        if loop.global_step % args.target_network_frequency == 0:
            parts.target_net.load_state_dict(parts.net.state_dict())


def everything(parts, loop) -> dict:
    """All the state that the next updates depend on, and the random stream they will draw from."""
    return dict(
        net=parts.net.state_dict(),
        target_net=parts.target_net.state_dict(),
        optimizer=parts.optimizer.state_dict(),
        replay=parts.replay.state_dict(True),
        global_step=loop.global_step,
        updates=loop.updates,
        torch_rng=torch.get_rng_state(),
    )


def assert_bitwise_equal(actual, expected, where="state"):
    """Equal bit for bit: float tensors compared as their bytes (torch.equal would take -0.0 for 0.0)."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i in range(len(expected)):
            assert_bitwise_equal(actual[i], expected[i], f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        actual_bytes = actual.detach().reshape(-1).contiguous().view(torch.uint8)
        expected_bytes = expected.detach().reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(actual_bytes, expected_bytes), where
    else:
        assert actual == expected, where


def masks(net) -> dict:
    return {name: buffer.clone() for name, buffer in net.named_buffers() if name.endswith("weight_mask")}


@pytest.mark.parametrize("name,method", CASES)
def test_a_resumed_run_goes_on_exactly_as_the_uninterrupted_one(name, method, tmp_path):
    module = load_script(name)
    args = tiny_args(module, method)
    loop = starting_loop(name, module, args)
    original = build_parts(name, module, args, loop, seed=0)
    play(original, args, loop, steps=6)
    masks_saved = masks(original.net)
    if method is not None:  # the pruner's state is not trivial: every layer has pruned weights
        assert all((mask == 0).any() for mask in masks_saved.values())

    # the checkpoint, written and read back with the script's own functions, as main() does at a checkpoint step
    run_dir = str(tmp_path)
    module.write_atomically(module.training_state(original, args, loop), f"{run_dir}/checkpoint.pt")

    play(original, args, loop, steps=6)  # the run that was not interrupted goes on
    expected = everything(original, loop)
    if method is not None:  # the masks changed after the checkpoint too, so the pruner's updates are compared
        assert any(not torch.equal(mask, masks_saved[key]) for key, mask in masks(original.net).items())

    # main() on --resume: read the checkpoint, build everything anew (another seed here, so nothing is carried over
    # but what the checkpoint holds; the pruner takes the schedule's steps from the saved loop), then restore
    state = module.read_checkpoint(run_dir, args)
    restored_loop = module.LoopState(**state["loop"])
    resumed = build_parts(name, module, args, restored_loop, seed=12345)
    assert not torch.equal(next(resumed.net.parameters()), next(original.net.parameters()))  # a different start
    module.restore_training_state(state, resumed)
    # main() then ends the replay's streams because its envs start new episodes (DeviceReplay.end_streams); this
    # test's "env" is a random stream that goes on, so neither side ends them
    play(resumed, args, restored_loop, steps=6)
    assert_bitwise_equal(everything(resumed, restored_loop), expected)


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_a_resume_keeps_the_events_logged_at_the_checkpoint_step(name, tmp_path):
    module = load_script(name)
    common = dict(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=16,
        learning_starts=10,
        train_frequency=1,
        buffer_size=200,
        batch_size=4,
        log_every=10,
        checkpoint_every=30,
        eval_episodes=0,
        progress_seconds=1e9,
        cuda=False,
        output_dir=str(tmp_path),
    )
    first = module.main(module.Args(total_timesteps=30, **common))
    module.main(module.Args(total_timesteps=60, resume=first["run_dir"], **common))
    events = EventAccumulator(first["run_dir"])
    events.Reload()
    # charts/epsilon is logged every --log-every steps; the first run logged 10, 20 and 30, then checkpointed
    assert [event.step for event in events.Scalars("charts/epsilon")] == [10, 20, 30, 40, 50, 60]
