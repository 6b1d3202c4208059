"""benchmark/update_breakdown.py: its profiler ranges wrap each script's own update without changing what it computes,
every part is found once per update and attributed without double counting, and kernels are attributed by launch
time across threads."""

from types import SimpleNamespace

import pytest
import torch

from benchmark import update_breakdown
from benchmark.scripts import ALL_SCRIPTS, load_script, training_parts


def small_args(module, **overrides):
    return module.Args(frame_size=24, buffer_size=600, batch_size=8, cuda=False, **overrides)


def parameters_after_updates(module, args, updates: int, ranged: bool) -> list:
    torch.manual_seed(0)
    parts = training_parts(module, args, torch.device("cpu"))
    torch.manual_seed(1)
    if ranged:
        with update_breakdown.Ranges(module, parts), torch.profiler.profile():
            for _ in range(updates):
                parts.update()
    else:
        for _ in range(updates):
            parts.update()
    return [parameter.detach().clone() for parameter in parts.net.parameters()] + [parts.replay.priorities.clone()]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_ranges_change_nothing_the_update_computes_and_are_removed_after(name):
    module = load_script(name)
    original_losses, original_backward = module.c51_losses, torch.Tensor.backward
    plain = parameters_after_updates(module, small_args(module), updates=3, ranged=False)
    ranged = parameters_after_updates(module, small_args(module), updates=3, ranged=True)
    for a, b in zip(plain, ranged):
        assert torch.equal(a, b)
    assert module.c51_losses is original_losses and torch.Tensor.backward is original_backward
    parts = training_parts(module, small_args(module), torch.device("cpu"))
    with update_breakdown.Ranges(module, parts):
        assert "forward" in vars(parts.net) and "sample" in vars(parts.replay)
    for obj, attribute in [(parts.net, "forward"), (parts.target_net, "forward"), (parts.replay, "sample")]:
        assert attribute not in vars(obj)
    assert "step" not in vars(parts.optimizer) and "update_priorities" not in vars(parts.replay)


@pytest.mark.parametrize("double_dqn", [True, False])
def test_every_part_is_found_and_nested_parts_are_not_counted_twice(double_dqn):
    module = load_script("rainbow_impala_gap")
    parts = training_parts(module, small_args(module, double_dqn=double_dqn), torch.device("cpu"))
    profiled = update_breakdown.profile_parts(module, parts, updates=3, device=torch.device("cpu"))
    expected = [part for part in update_breakdown.PARTS if double_dqn or part != "selector_forward"]
    assert [part for part in update_breakdown.PARTS if part in profiled] == expected
    # loss_rest and other are what remains of an enclosing range once its inner ranges are taken out: a range counted
    # twice, or one outside its parent, would make them negative
    for part in expected:
        assert profiled[part]["host_ms"] >= 0.0, part
    assert profiled["update"]["host_ms"] > 0.0


def event(start_us: float, kernel_us: list):
    kernels = [SimpleNamespace(duration=duration) for duration in kernel_us]
    return SimpleNamespace(time_range=SimpleNamespace(start=start_us), kernels=kernels)


def test_kernels_count_where_their_launch_started():
    launchers = [event(5.0, [10.0]), event(12.0, [1.0, 2.0]), event(20.0, [100.0]), event(30.0, [7.0])]
    # a range from 10 to 20 us holds the launches at 12 and 20 (of any thread), not those at 5 and 30
    assert update_breakdown.launched_within(10.0, 20.0, launchers) == (3, 0.103)
    assert update_breakdown.launched_within(40.0, 50.0, launchers) == (0, 0.0)


def test_main_writes_one_row_per_part_and_per_mode(tmp_path):
    args = update_breakdown.Args(
        scripts=["rainbow_impala_gap"],
        scales=[1],
        poolings=["gap"],
        modes=["eager"],
        buffer_size=600,
        frame_size=24,
        repeats=1,
        profiled_updates=1,
        cuda=False,
        out=str(tmp_path),
    )
    part_rows, update_rows = update_breakdown.main(args)
    assert [row["part"] for row in part_rows] == update_breakdown.PARTS
    assert [(row["mode"], row["pooling"]) for row in update_rows] == [("eager", "gap")]
    assert update_rows[0]["update_ms"] > 0 and update_rows[0]["kernel_ms"] is None  # no kernels on a CPU
    with open(tmp_path / "parts.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + len(update_breakdown.PARTS)
    assert (tmp_path / "update_breakdown.md").read_text().count("\n| rainbow_impala_gap") == len(update_breakdown.PARTS) + 1


def test_device_work_counts_the_device_side_events_per_update():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(device_type=cuda, time_range=SimpleNamespace(start=0.0, end=30.0)),
        SimpleNamespace(device_type=cpu, time_range=SimpleNamespace(start=0.0, end=500.0)),  # a host op: not counted
        SimpleNamespace(device_type=cuda, time_range=SimpleNamespace(start=40.0, end=50.0)),
    ]
    assert update_breakdown.device_work(events, updates=2) == (1.0, 0.02)
