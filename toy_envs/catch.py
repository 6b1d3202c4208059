"""Catch: a tiny pixel environment for a first run and the learning tests (after Osband et al.'s bsuite catch).

A ball falls one row per step from a random column of a ROWS x COLUMNS board; the agent moves a paddle on the
bottom row left, not at all, or right. Reward +1 for a catch, -1 for a miss, at the last step. Observations are
uint8 images (ROWS*CELL x COLUMNS*CELL), so the scripts treat it as any pixel env:
`--env-backend gymnasium --env-id toy_envs.catch:Catch-v0`.
A uniformly random policy catches about a quarter of the balls (mean return about -0.5); a good one all of them.
"""

import gymnasium as gym
import numpy as np

ROWS, COLUMNS, CELL = 8, 5, 4


class Catch(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (ROWS * CELL, COLUMNS * CELL), np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def _observation(self):
        board = np.zeros((ROWS, COLUMNS), np.uint8)
        board[self.ball_row, self.ball_column] = 255
        board[ROWS - 1, self.paddle] = 255
        return np.kron(board, np.ones((CELL, CELL), np.uint8))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.ball_row, self.ball_column = 0, int(self.np_random.integers(COLUMNS))
        self.paddle = COLUMNS // 2
        return self._observation(), {}

    def step(self, action):
        self.paddle = int(np.clip(self.paddle + int(action) - 1, 0, COLUMNS - 1))
        self.ball_row += 1
        terminated = self.ball_row == ROWS - 1
        reward = (1.0 if self.paddle == self.ball_column else -1.0) if terminated else 0.0
        return self._observation(), reward, terminated, False, {}


gym.register("Catch-v0", entry_point=Catch, max_episode_steps=100)


class ContinuousCatch(Catch):
    """Catch with a continuous paddle velocity: a pixel env the value-based scripts must refuse."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


gym.register("ContinuousCatch-v0", entry_point=ContinuousCatch, max_episode_steps=100)


class CatchLives(Catch):
    """Catch with three lives, as an Atari game has them: a miss costs a life (`info["lives"]`) and the next ball
    falls; the game ends when no life is left. A game's return is its catches minus 3."""

    LIVES = 3

    def reset(self, seed=None, options=None):
        observation, _ = super().reset(seed=seed)
        self.lives = self.LIVES
        return observation, {"lives": self.lives}

    def step(self, action):
        observation, reward, ball_landed, truncated, _ = super().step(action)
        self.lives -= int(reward < 0)
        terminated = self.lives == 0
        if ball_landed and not terminated:
            self.ball_row, self.ball_column = 0, int(self.np_random.integers(COLUMNS))
            observation = self._observation()
        return observation, reward, terminated, truncated, {"lives": self.lives}


gym.register("CatchLives-v0", entry_point=CatchLives, max_episode_steps=1000)
