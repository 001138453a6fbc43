"""Gymnasium vector environments as one batched TF-Agents environment.

tf-agents 0.19 has no gymnasium adapter, so `BatchedEnvironment` is ours: a
gymnasium `VectorEnv` of E environments presented as a single batched
`PyEnvironment`, so that the driver calls the policy once per step for all E.
Gymnasium's next-step autoreset is exactly TF-Agents' convention: the step
after LAST returns FIRST and ignores its action.

Atari ids run on ale-py's native `AtariVectorEnv` (C++ threads, no Python per
environment) with the standard DQN preprocessing (Machado et al. 2018): up to
30 no-op starts, frame skip 4 with max-pooling of the last two frames, 84x84
grayscale, a stack of the last 4 frames. Training rewards are clipped, episode
returns are reported unclipped, and a lost life may cut the bootstrap without
resetting the game. Classic-control ids use gymnasium's Python environments;
Atari can too (`native=False`: gymnasium's wrappers, which give the same frames).
"""

import collections
import functools

import ale_py
import gymnasium as gym
import numpy as np
from ale_py.vector_env import AtariVectorEnv
from tf_agents.environments import py_environment
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.settings.config import ATARI_FRAME_SKIP, EnvConfig, is_atari
from dqnfleet.core.settings.flags import ConfigError

gym.register_envs(ale_py)

ATARI_SCREEN_SIZE = 84
# ALE's per-frame probability of repeating the previous action when sticky
# actions are on (Machado et al. 2018; Dopamine's protocol).
STICKY_ACTION_PROBABILITY = 0.25
# Episodes end after 108,000 emulator frames (30 minutes of play) at most.
MAX_EPISODE_FRAMES = 108_000


def make_env(config: EnvConfig) -> gym.Env:
  """One gymnasium environment with the preprocessing its family needs."""
  if not is_atari(config.env_id):
    return gym.make(config.env_id)
  # Frame skipping belongs to the preprocessing (it max-pools the last two
  # frames), so the emulator itself must not skip.
  env = gym.make(
    config.env_id,
    frameskip=1,
    repeat_action_probability=sticky_probability(config),
    max_num_frames_per_episode=MAX_EPISODE_FRAMES,
  )
  env = gym.wrappers.AtariPreprocessing(
    env,
    noop_max=config.noop_max,
    frame_skip=ATARI_FRAME_SKIP,
    screen_size=ATARI_SCREEN_SIZE,
    grayscale_obs=True,
    scale_obs=False,
    terminal_on_life_loss=False,
  )  # life loss is handled below without a reset
  return gym.wrappers.FrameStackObservation(env, stack_size=config.frame_stack)


def sticky_probability(config: EnvConfig) -> float:
  return STICKY_ACTION_PROBABILITY if config.sticky_actions else 0.0


def make_vector_env(
  config: EnvConfig, num_envs: int, *, native: bool = True, threads: int = 0
) -> gym.vector.VectorEnv:
  """E environments with next-step autoreset: native ALE for Atari, else Python ones."""
  if is_atari(config.env_id) and native:
    return AtariVectorEnv(
      gym.spec(config.env_id).kwargs["game"],
      num_envs,
      num_threads=threads or num_envs,
      frameskip=ATARI_FRAME_SKIP,
      img_height=ATARI_SCREEN_SIZE,
      img_width=ATARI_SCREEN_SIZE,
      stack_num=config.frame_stack,
      grayscale=True,
      maxpool=True,
      noop_max=config.noop_max,
      repeat_action_probability=sticky_probability(config),
      max_num_frames_per_episode=MAX_EPISODE_FRAMES,
      # Clipping, life loss and FIRE are ours to decide (see BatchedEnvironment).
      reward_clipping=False,
      episodic_life=False,
      use_fire_reset=False,
      autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
    )
  return gym.vector.SyncVectorEnv(
    [functools.partial(make_env, config) for _ in range(num_envs)],
    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
  )


def validate_env(config: EnvConfig) -> None:
  """Refuses ids that are unknown or that DQN cannot act in."""
  try:
    gym.spec(config.env_id)
  except gym.error.Error:
    raise ConfigError(
      f"--env-id {config.env_id!r} is not a registered gymnasium environment; use an Atari "
      "id such as ALE/Breakout-v5 or a classic-control id such as CartPole-v1"
    ) from None
  env = make_env(config)
  try:
    if not isinstance(env.action_space, gym.spaces.Discrete):
      raise ConfigError(
        f"--env-id {config.env_id!r} has {env.action_space} actions; DQN "
        "needs a Discrete action space (e.g. CartPole-v1, ALE/Breakout-v5)"
      )
    space = env.observation_space
    if not is_atari(config.env_id) and not (
      isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    ):
      raise ConfigError(
        f"--env-id {config.env_id!r} observes {space}; non-Atari ids need a "
        "1-D Box observation (a state vector, e.g. CartPole-v1)"
      )
  finally:
    env.close()


class BatchedEnvironment(py_environment.PyEnvironment):
  """E environments as one batched TF-Agents environment.

  With `training=True`, rewards are clipped and life loss ends the bootstrap
  as the config says; with `training=False` (evaluation) neither happens.
  Finished episodes are queued in `finished_episodes` for the caller to report.
  `send` and `receive` split a step in two, so that the caller can work (write
  the last transition to replay) while native environments step in C++.
  """

  def __init__(
    self,
    config: EnvConfig,
    num_envs: int,
    seed: int,
    *,
    training: bool = True,
    native: bool = True,
    threads: int = 0,
  ):
    super().__init__(handle_auto_reset=False)
    self._vec = make_vector_env(config, num_envs, native=native, threads=threads)
    self._num_envs = num_envs
    self._seed = seed
    self._pixels = is_atari(config.env_id)
    self._clip = training and config.clip_rewards
    self._life_loss = training and config.terminal_on_life_loss and self._pixels
    single_obs = self._vec.single_observation_space
    n_actions = int(self._vec.single_action_space.n)
    if self._pixels:
      # [k, H, W]: frames stacked first, as ALE renders them and replay stores them
      # (networks.StackedFramesConv reads them so, without interleaving them into pixels).
      self._observation_spec = array_spec.BoundedArraySpec(
        single_obs.shape, np.uint8, 0, 255, name="observation"
      )
    else:
      self._observation_spec = array_spec.ArraySpec(single_obs.shape, np.float32, "observation")
    self._action_spec = array_spec.BoundedArraySpec((), np.int64, 0, n_actions - 1, "action")
    self._was_last = np.zeros(num_envs, bool)
    self._lives = np.zeros(num_envs)
    self._returns = np.zeros(num_envs)
    self._lengths = np.zeros(num_envs, np.int64)
    # (env index, unclipped return, length) of each finished episode
    self.finished_episodes: collections.deque = collections.deque()

  @property
  def batched(self) -> bool:
    return True

  @property
  def batch_size(self) -> int:
    return self._num_envs

  def observation_spec(self):
    return self._observation_spec

  def action_spec(self):
    return self._action_spec

  def _observe(self, obs: np.ndarray) -> np.ndarray:
    return obs if self._pixels else obs.astype(np.float32)

  def _reset(self) -> ts.TimeStep:
    obs, info = self._vec.reset(seed=self._seed)
    self._was_last[:] = False
    self._returns[:] = 0
    self._lengths[:] = 0
    self._lives = np.asarray(info.get("lives", self._lives), dtype=np.float64)
    n = self._num_envs
    return ts.TimeStep(
      step_type=np.full(n, ts.StepType.FIRST, np.int32),
      reward=np.zeros(n, np.float32),
      discount=np.ones(n, np.float32),
      observation=self._observe(obs),
    )

  def send(self, action) -> None:
    """Starts a step; native environments run it in their own threads."""
    action = np.asarray(action, np.int64)
    if isinstance(self._vec, AtariVectorEnv):
      self._vec.send(action)
    else:
      self._sent = action

  def receive(self) -> ts.TimeStep:
    """Waits for the step that `send` started."""
    if isinstance(self._vec, AtariVectorEnv):
      result = self._vec.recv()
    else:
      result = self._vec.step(self._sent)
    return self._time_step(*result)

  def _step(self, action: np.ndarray) -> ts.TimeStep:
    self.send(action)
    return self.receive()

  def _time_step(self, obs, reward, terminated, truncated, info) -> ts.TimeStep:
    # Environments that were LAST were just reset by the vector env and
    # ignored their action: this step is their FIRST.
    first = self._was_last
    last = (terminated | truncated) & ~first
    reward = np.where(first, 0.0, reward.astype(np.float64))
    self._returns = np.where(first, 0.0, self._returns + reward)
    self._lengths = np.where(first, 0, self._lengths + 1)
    for i in np.flatnonzero(last):
      self.finished_episodes.append((int(i), float(self._returns[i]), int(self._lengths[i])))

    discount = np.where(terminated & ~first, 0.0, 1.0)
    if "lives" in info:
      lives = np.asarray(info["lives"], dtype=np.float64)
      if self._life_loss:
        discount = np.where((lives < self._lives) & ~first, 0.0, discount)
      self._lives = lives
    if self._clip:
      reward = np.sign(reward)
    self._was_last = last
    step_type = np.where(
      first, ts.StepType.FIRST, np.where(last, ts.StepType.LAST, ts.StepType.MID)
    ).astype(np.int32)
    return ts.TimeStep(
      step_type=step_type,
      reward=reward.astype(np.float32),
      discount=discount.astype(np.float32),
      observation=self._observe(obs),
    )

  def close(self) -> None:
    self._vec.close()
