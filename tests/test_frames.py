"""The frames the agent sees: the flagship's two Atari backends against each other and against a brute force.

Both backends play Pong with sticky actions off and the same fixed actions. With sticky actions off, Pong in the ALE
has no randomness left (the seed only drives sticky actions: seeds 1 and 2 give identical screens in both), so
envpool's and gymnasium's different ways of turning the seed into an ALE seed do not matter; both get the same seed.

envpool with `noop_max=1` plays exactly one no-op frame at reset (its no-op count is uniform on {0, ..., noop_max - 1}
plus one), so its whole frame sequence is one raw frame later than the gymnasium backend's.
test_envpool_frames_are_opencv_area_resizes_one_raw_frame_late shows this against the raw screens, and the backend
comparison accounts for it by playing one extra no-op frame in the gymnasium env right after its reset.
"""

import math

import gymnasium as gym
import numpy as np

from benchmark.scripts import load_script

gap = load_script("rainbow_impala_gap")
SEED, SIZE = 1, 84
STEPS = 150  # agent steps: the ball is served and both paddles move well within this window
ACTIONS = np.random.default_rng(0).integers(0, 6, STEPS)  # Pong's minimal action set has 6 actions


def pong_args(backend: str) -> "gap.Args":
    env_id = "Pong-v5" if backend == "envpool" else "ALE/Pong-v5"
    return gap.Args(env_id=env_id, env_backend=backend, sticky_action_prob=0.0, frame_size=SIZE, cuda=False)


def backend_frames(backend: str, extra_noop_frames: int = 0) -> list:
    """The frames the script's env gives: the one after reset, then one per agent step of ACTIONS.
    `extra_noop_frames` raw no-op frames are played in the (gymnasium) env right after its reset."""
    envs = gap.make_env(pong_args(backend), num_envs=1, seed=SEED)
    frames = [envs.reset()[0]]
    for _ in range(extra_noop_frames):
        screen = envs.envs[0].step(0)[0]  # the ALE env under the adapter steps one raw frame (frameskip=1)
        frames[0] = gap.to_gray_frame(screen, SIZE)
    for action in ACTIONS:
        step_frames, _, terminated, truncated = envs.step(np.array([action]))
        assert not (terminated[0] or truncated[0])  # a Pong game lasts far longer than this window
        frames.append(step_frames[0])
    envs.close()
    return frames


def raw_screens(noop_frames_after_reset: int) -> list:
    """Every raw 210x160 grayscale screen of a plain ALE Pong: the reset screen, the no-op frames, then four frames
    per action of ACTIONS (one entry per emulated frame)."""
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.0, obs_type="grayscale", full_action_space=False)
    screens = [env.reset(seed=SEED)[0]]
    for _ in range(noop_frames_after_reset):
        screens.append(env.step(0)[0])
    for action in ACTIONS:
        for _ in range(4):
            screens.append(env.step(int(action))[0])
    env.close()
    return screens


def observed_screens(screens: list, first: int, max_of_last_two: bool = True) -> list:
    """The full-size screen of each observation: screens[first] at reset, then for agent step k (frame skip 4) the
    elementwise max of its last two frames, screens[first + 4k - 1] and screens[first + 4k] (or the last alone)."""
    observed = [screens[first]]
    for k in range(1, STEPS + 1):
        last = screens[first + 4 * k]
        if max_of_last_two:
            observed.append(np.maximum(screens[first + 4 * k - 1], last))
        else:
            observed.append(last)
    return observed


def region_indicators(n_in: int, n_out: int) -> np.ndarray:
    """Along one axis, row i marks with ones the input pixels [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)) that
    torch's adaptive average pooling averages for output i (neighbouring regions overlap; no fractional weights)."""
    indicators = np.zeros((n_out, n_in), dtype=np.int64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -(-((i + 1) * n_in) // n_out)  # ceil in integers
        indicators[i, start:end] = 1
    return indicators


def adaptive_area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """torch's F.interpolate(mode='area'), which is adaptive average pooling, by hand: output pixel (i, j) is the
    plain mean of its rows' region times its columns' region. The sums are exact integers (0/1 matrices), so each
    mean is one correctly rounded division."""
    rows, columns = region_indicators(image.shape[0], size), region_indicators(image.shape[1], size)
    sums = rows @ image.astype(np.int64) @ columns.T
    counts = np.outer(rows.sum(1), columns.sum(1))
    return sums / counts


def fractional_area_weights(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV's INTER_AREA for shrinking, along one axis: output i averages the input interval [i*s, (i+1)*s),
    s = n_in/n_out, each input pixel weighted by the length of its overlap with that interval."""
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        low, high = i * scale, (i + 1) * scale
        for j in range(math.floor(low), math.ceil(high)):
            weights[i, j] = (min(high, j + 1) - max(low, j)) / scale
    return weights


def opencv_area_resize(image: np.ndarray, size: int) -> np.ndarray:
    rows, columns = fractional_area_weights(image.shape[0], size), fractional_area_weights(image.shape[1], size)
    return rows @ image.astype(np.float64) @ columns.T


def test_gymnasium_frame_is_the_max_of_the_last_two_screens_area_resized():
    """The adapter's frame equals the brute force: max over the last two raw screens of each 4-frame skip, then
    the hand-written adaptive average, rounded half to even as the script's np.round does. Exact: a region holds
    6 or 9 integer pixels, so the float32 and float64 means round the same (a mean is either an exact tie, k + 0.5
    in both, or at least 1/18 away from one)."""
    frames = backend_frames("gymnasium")
    screens = raw_screens(0)
    expected = [np.round(adaptive_area_resize(s, SIZE)).astype(np.uint8) for s in observed_screens(screens, 0)]
    for step in range(STEPS + 1):
        np.testing.assert_array_equal(frames[step], expected[step], err_msg=f"agent step {step}")
    # the window is one where the max matters: the last screen alone gives other frames (the ball and paddles move
    # between the two screens; measured: 144 of the 151 frames differ), so an adapter without the max fails above
    last_only = [
        np.round(adaptive_area_resize(s, SIZE)).astype(np.uint8) for s in observed_screens(screens, 0, max_of_last_two=False)
    ]
    differing = [step for step in range(STEPS + 1) if not np.array_equal(last_only[step], expected[step])]
    assert len(differing) >= 10


def test_envpool_frames_are_opencv_area_resizes_one_raw_frame_late():
    """envpool's frames are OpenCV area resizes of the same max-of-two screens, taken one raw no-op frame after the
    ALE's reset: with that offset they agree to rounding (measured max 0.5 grey levels); without it, or with two
    frames, the ball and paddles are elsewhere (measured max 123 and 162)."""
    frames = backend_frames("envpool")
    for offset, should_match in [(0, False), (1, True), (2, False)]:
        screens = observed_screens(raw_screens(offset), offset)
        errors = [np.abs(frames[k] - opencv_area_resize(screens[k], SIZE)).max() for k in range(STEPS + 1)]
        if should_match:
            assert max(errors) <= 0.5 + 1e-6, f"offset {offset}: {max(errors)}"
        else:
            assert max(errors) > 50, f"offset {offset}: {max(errors)}"


def test_envpool_and_gymnasium_backends_see_the_same_frames():
    """The two backends agree once the gymnasium env plays envpool's reset no-op frame too. What is left is the
    resize: torch's adaptive average (equal weights, overlapping regions) against OpenCV's INTER_AREA (fractional
    weights). Measured over these 151 frames: mean |difference| 0.46 grey levels (at most 0.48 in one frame), max 50.
    Bound on the max: half the L1 distance between the two resizes' weights is at most 0.336 for any output pixel
    (210x160 -> 84x84), and Pong's screens span grey levels 0 to 236, so 0.336 * 236 + 1 for rounding = 80. Without
    the extra no-op frame (a one-frame offset) the max is 117: the moving ball and paddles are a frame apart."""
    envpool_frames = backend_frames("envpool")
    gymnasium_frames = backend_frames("gymnasium", extra_noop_frames=1)
    worst_mean, worst_max = 0.0, 0
    for step in range(STEPS + 1):
        difference = np.abs(envpool_frames[step].astype(np.int64) - gymnasium_frames[step].astype(np.int64))
        worst_mean = max(worst_mean, difference.mean())
        worst_max = max(worst_max, int(difference.max()))
    assert worst_mean < 0.75, worst_mean
    assert worst_max <= 80, worst_max
