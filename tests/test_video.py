"""--capture-video: a tiny Catch run of each script saves evaluation episodes as animated GIFs in the run folder and in
TensorBoard, frame for frame what the agent saw; checkpoints written before the flag existed still resume."""

import glob
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from benchmark.scripts import ALL_SCRIPTS, load_script

CATCH_STEPS = 7  # a Catch episode: the ball falls one row a step, from row 0 to the paddle's row 7


def catch_args(module, output_dir, **changes):
    """A tiny Catch run with --capture-video: 60 agent steps in iterations of 30, learning from step 20."""
    args = dict(
        env_backend="gymnasium",
        env_id="toy_envs.catch:Catch-v0",
        frame_size=16,
        cuda=False,
        output_dir=str(output_dir),
        total_timesteps=60,
        learning_starts=20,
        buffer_size=500,
        iteration_steps=30,
        progress_seconds=1e9,
        capture_video=True,
    )
    return module.Args(**{**args, **changes})


def spy_on_evaluation(module, monkeypatch) -> list:
    """The newest frame of env 0's stack each time an evaluation (noise off) picks actions: what the agent saw."""
    seen, select_actions = [], module.select_actions

    def spy(net, obs, epsilon, with_noise):
        if not with_noise:
            seen.append(obs[0, -1].clone().numpy())
        return select_actions(net, obs, epsilon, with_noise)

    monkeypatch.setattr(module, "select_actions", spy)
    return seen


def videos(run_dir, rgb: bool) -> dict:
    """step -> (frames, durations) of videos/eval_step{step}.gif, the frames as the agent's: H x W gray or 3 x H x W RGB."""
    result = {}
    for path in glob.glob(os.path.join(run_dir, "videos", "eval_step*.gif")):
        with Image.open(path) as gif:
            assert gif.format == "GIF" and gif.is_animated
            frames = [np.array(frame.convert("RGB" if rgb else "L")) for frame in ImageSequence.Iterator(gif)]
            durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
        step = int(os.path.basename(path)[len("eval_step") : -len(".gif")])
        result[step] = [frame.transpose(2, 0, 1) if rgb else frame for frame in frames], durations
    return dict(sorted(result.items()))


@pytest.mark.parametrize("name", ALL_SCRIPTS)
@pytest.mark.parametrize("eval_episodes", [0, 2])
def test_capture_video_saves_what_the_agent_saw(name, eval_episodes, tmp_path, monkeypatch, capsys):
    """With evaluations, the first episode of each (the flagship family evaluates once, at the end; DER and Procgen
    after each iteration); without, one episode at the end played as evaluation plays. A GIF frame for each action
    the agent took: the reset frame and the frames after each step but the last (the next episode's first frame comes
    back in its place), 7 in Catch, whose consecutive frames all differ (Pillow merges none). The GIF palette keeps
    the frames exactly, grayscale (the ALE scripts) and RGB (Procgen; Catch's gray repeated)."""
    module = load_script(name)
    seen = spy_on_evaluation(module, monkeypatch)
    summary = module.main(catch_args(module, tmp_path, eval_episodes=eval_episodes))

    recorded = videos(summary["run_dir"], rgb=seen[0].ndim == 3)
    each_iteration = eval_episodes > 0 and name in ("der_atari100k_gap", "rainbow_procgen_gap")
    assert list(recorded) == ([30, 60] if each_iteration else [60])
    for i, (frames, durations) in enumerate(recorded.values()):
        # every evaluation (or episode without one) begins with env 0's 7-step episode; DER's and Procgen's envs all
        # end with it, the flagship family's one evaluation plays a second episode after it
        episode = seen[i * CATCH_STEPS : (i + 1) * CATCH_STEPS]
        assert len(frames) == len(episode) == CATCH_STEPS and frames[0].shape[-2:] == (16, 16)
        assert all(np.array_equal(gif, agent) for gif, agent in zip(frames, episode))
        assert durations == [module.VIDEO_FRAME_MS] * CATCH_STEPS

    events = EventAccumulator(summary["run_dir"], size_guidance={IMAGES: 0})
    events.Reload()
    images = events.Images("eval/video")
    assert [image.step for image in images] == list(recorded)
    for image in images:
        with open(os.path.join(summary["run_dir"], "videos", f"eval_step{image.step}.gif"), "rb") as f:
            assert image.encoded_image_string == f.read() and (image.width, image.height) == (16, 16)

    if eval_episodes:  # the last line names the evaluation's mean return
        (done,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
        assert re.search(rf"evaluation (on unseen levels )?{re.escape(str(summary['eval_return']))}", done), done


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_the_video_keeps_at_most_video_max_frames(name, tmp_path, monkeypatch):
    """A long episode cannot fill the memory or the disk: the GIF keeps its first VIDEO_MAX_FRAMES frames."""
    module = load_script(name)
    monkeypatch.setattr(module, "VIDEO_MAX_FRAMES", 4)
    seen = spy_on_evaluation(module, monkeypatch)
    summary = module.main(catch_args(module, tmp_path, eval_episodes=0))
    ((frames, _),) = videos(summary["run_dir"], rgb=seen[0].ndim == 3).values()
    assert len(seen) == CATCH_STEPS and len(frames) == 4  # the episode was played to its end, 4 frames kept
    assert all(np.array_equal(gif, agent) for gif, agent in zip(frames, seen))


def test_without_capture_video_nothing_is_recorded(tmp_path):
    module = load_script("der_atari100k_gap")
    summary = module.main(catch_args(module, tmp_path, eval_episodes=2, capture_video=False))
    assert not os.path.exists(os.path.join(summary["run_dir"], "videos"))
    events = EventAccumulator(summary["run_dir"])
    events.Reload()
    assert events.Tags()["images"] == [] and events.Scalars("eval/mean_return")


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_a_checkpoint_from_before_capture_video_resumes_with_it(name, tmp_path):
    """Runs checkpointed before --capture-video existed (their saved args lack it) resume, here with it on."""
    module = load_script(name)
    first = module.main(catch_args(module, tmp_path, total_timesteps=30, checkpoint_every=30, capture_video=False))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    state = torch.load(path, weights_only=False)
    del state["args"]["capture_video"]
    torch.save(state, path)

    resumed = module.main(catch_args(module, tmp_path, resume=first["run_dir"], eval_episodes=0))
    assert resumed["run_dir"] == first["run_dir"] and resumed["env_steps"] == 60
    assert list(videos(first["run_dir"], rgb=name == "rainbow_procgen_gap")) == [60]
