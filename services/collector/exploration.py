"""Exploration: the epsilon each of a collector's environments acts with.

Two schedules (CollectorConfig.exploration):

  decay   every environment of the fleet follows one linear decay from
          epsilon_start to epsilon_end over the agent steps the whole fleet
          has written to replay (Nature DQN, Dopamine).
  ladder  each episode draws its epsilon from the Ape-X ladder
          epsilon_i = base^(1 + alpha * i / (rungs - 1)), i = 0 .. rungs-1
          (Horgan et al. 2018: 0.4^1 ... 0.4^8). Ape-X gives actor i of N the
          i-th rung for good; a draw per episode, as Acme does, needs no fleet
          size and keeps the fleet's mix of epsilons whatever collectors come
          and go, and over a long run, unlike a decay, it never ends with every
          actor near-greedy.

Both act with epsilon_start until the first trained policy arrives: an
untrained network's greedy actions are no better than random ones, and
replay's first min_size items should cover the game.
"""

import numpy as np
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.settings.config import CollectorConfig
from dqnfleet.core.transport import metrics

EPISODE_EPSILON = metrics.histogram(
  "collector_episode_epsilon",
  "Epsilon each episode started with (the ladder's draw; the decay's value at its start).",
  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)


def epsilon_at(fleet_steps: int, config: CollectorConfig) -> float:
  """The decay: linear over the agent steps the whole fleet has collected."""
  fraction = min(1.0, max(0, fleet_steps) / config.epsilon_decay_steps)
  return config.epsilon_start + fraction * (config.epsilon_end - config.epsilon_start)


def ladder(rungs: int, base: float, alpha: float) -> np.ndarray:
  """The Ape-X epsilons base^(1 + alpha * i / (rungs - 1)), most exploring first."""
  return base ** (1 + alpha * np.arange(rungs) / (rungs - 1))


class Exploration:
  """Per-environment epsilons; `before_step` is called with each batch of time steps."""

  def __init__(self, config: CollectorConfig, num_envs: int, seed: int):
    self.config = config
    self.rungs = ladder(config.ladder_rungs, config.ladder_base, config.ladder_alpha)
    self._rng = np.random.default_rng(seed)
    self._rung = self._rng.integers(len(self.rungs), size=num_envs)
    self.trained = False  # acting with a trained policy (version > 0)
    self.fleet_steps = 0
    self.epsilons = np.full(num_envs, config.epsilon_start, np.float32)
    self._refresh()
    for epsilon in self.epsilons:
      EPISODE_EPSILON.observe(float(epsilon))

  def update(self, fleet_steps: int, trained: bool) -> None:
    """A new fleet step count or policy: the decay moves, the ladder starts."""
    self.fleet_steps, self.trained = max(self.fleet_steps, fleet_steps), trained
    self._refresh()

  def before_step(self, step_types: np.ndarray) -> np.ndarray:
    """The [E] epsilons to act on these time steps with.

    An environment whose episode just ended (its action now is discarded by
    the autoreset) draws the next episode's rung here, so its first step
    already explores at the new rate.
    """
    ended = np.flatnonzero(step_types == ts.StepType.LAST)
    if len(ended):
      if self.config.exploration == "ladder":
        self._rung[ended] = self._rng.integers(len(self.rungs), size=len(ended))
        self._refresh()
      for i in ended:
        EPISODE_EPSILON.observe(float(self.epsilons[i]))
    return self.epsilons

  def _refresh(self) -> None:
    if not self.trained:
      self.epsilons[:] = self.config.epsilon_start
    elif self.config.exploration == "ladder":
      self.epsilons[:] = self.rungs[self._rung]
    else:
      self.epsilons[:] = epsilon_at(self.fleet_steps, self.config)
