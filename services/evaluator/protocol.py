"""The evaluation protocol: how a policy's score is measured, as published.

Atari defaults follow Nature DQN (Mnih et al. 2015): whole games of all lives
(a lost life does not end the episode, unlike training), up to 30 no-op
starts, epsilon 0.05, no sticky actions, at most 108,000 frames (30 minutes of
play) per episode, unclipped score. Dopamine's protocol differs: epsilon
0.001 and sticky actions (`--epsilon 0.001 --eval-sticky-actions`).

Each environment of a round counts only its first episode, so short episodes
do not crowd out long ones (a biased sample of the policy's returns).
"""

import dataclasses
import math
import pathlib
import threading

import numpy as np
import tensorflow as tf
from PIL import Image
from tf_agents.policies import py_tf_eager_policy

from dqnfleet.core.rl import envs, networks
from dqnfleet.core.rl.specs import EnvSpecs
from dqnfleet.core.settings.config import EnvConfig, ProtocolConfig, is_atari

# A GIF frame per agent step: 4 emulator frames at 60 Hz is 15 steps/s.
GIF_FRAME_MS = 67
GIF_SCALE = 2
# Long games are cut in the GIF (not in the score): 3 minutes of play.
MAX_GIF_FRAMES = 2_700


def describe(protocol: ProtocolConfig, env: EnvConfig) -> str:
  """One line that says how the numbers next to it were measured."""
  if not is_atari(env.env_id):
    return (
      f"{protocol.episodes} episodes, epsilon {protocol.epsilon:g}, "
      f"environment seeds from {protocol.eval_seed}"
    )
  name = ""
  if protocol.epsilon == 0.05 and not protocol.eval_sticky_actions:
    name = " (Nature DQN protocol)"
  elif protocol.epsilon == 0.001 and protocol.eval_sticky_actions:
    name = " (Dopamine protocol)"
  sticky = "sticky actions 0.25" if protocol.eval_sticky_actions else "no sticky actions"
  return (
    f"{protocol.episodes} episodes of whole games (all lives), epsilon "
    f"{protocol.epsilon:g}, {sticky}, up to {env.noop_max} no-op starts, at most "
    f"{envs.MAX_EPISODE_FRAMES:,} frames per episode, unclipped score{name}"
  )


@dataclasses.dataclass
class Result:
  returns: list[float]
  lengths: list[int]  # agent steps per episode
  # What the agent saw in the best episode: recorded for pixel environments only.
  best_frames: list[np.ndarray] | None = None

  def summary(self) -> dict:
    r = np.asarray(self.returns)
    return {
      "episodes": len(self.returns),
      "mean_return": float(r.mean()),
      "median_return": float(np.median(r)),
      "min_return": float(r.min()),
      "max_return": float(r.max()),
      "std_return": float(r.std()),
      "mean_length": float(np.mean(self.lengths)),
      "returns": list(self.returns),
      "lengths": list(self.lengths),
    }


class Interrupted(Exception):
  """`stop` was set during an evaluation; its partial results are dropped."""


def run(
  env_config: EnvConfig,
  env_specs: EnvSpecs,
  network,
  protocol: ProtocolConfig,
  *,
  record: bool = False,
  threads: int = 0,
  stop: threading.Event | None = None,
) -> Result:
  """Plays `protocol.episodes` episodes with `network`; records the best one if asked.

  A long Atari evaluation outlasts a container's stop grace period, so a
  service passes `stop` and the evaluation ends at the next step once it is set.
  """
  env_config = dataclasses.replace(env_config, sticky_actions=protocol.eval_sticky_actions)
  record = record and is_atari(env_config.env_id)  # state vectors make no video
  epsilon = tf.Variable(protocol.epsilon, dtype=tf.float32, trainable=False)
  policy = py_tf_eager_policy.PyTFEagerPolicy(
    networks.epsilon_greedy(env_specs, network, epsilon),
    use_tf_function=True,
    batch_time_steps=False,
  )
  returns, lengths, best = [], [], None
  num_envs = min(protocol.eval_num_envs, protocol.episodes)
  for round_ in range(math.ceil(protocol.episodes / num_envs)):
    wanted = min(num_envs, protocol.episodes - len(returns))
    env = envs.BatchedEnvironment(
      env_config, wanted, protocol.eval_seed + round_ * num_envs, training=False, threads=threads
    )
    done: dict[int, tuple[float, int]] = {}
    frames = [[] for _ in range(wanted)] if record else None
    try:
      time_step = env.reset()
      while len(done) < wanted:
        if stop is not None and stop.is_set():
          raise Interrupted()
        if record:
          newest = env_specs.newest_frames(time_step.observation)
          for i in range(wanted):
            if i not in done and len(frames[i]) < MAX_GIF_FRAMES:
              frames[i].append(newest[i])
        time_step = env.step(policy.action(time_step).action)
        while env.finished_episodes:
          index, episode_return, length = env.finished_episodes.popleft()
          if index in done:
            continue
          done[index] = (episode_return, length)
          if record:
            if best is None or episode_return > best[0]:
              best = (episode_return, frames[index])
            frames[index] = []
    finally:
      env.close()
    for i in sorted(done):
      returns.append(done[i][0])
      lengths.append(done[i][1])
  return Result(returns, lengths, best[1] if best else None)


def gif_temporary(path: pathlib.Path) -> pathlib.Path:
  """Where write_gif writes before it renames."""
  return path.with_name(f".{path.name}.tmp")


def write_gif(frames: list[np.ndarray], path: str | pathlib.Path) -> pathlib.Path:
  """An animated GIF at real-time speed, the 84x84 frames scaled up for viewing."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  size = (frames[0].shape[1] * GIF_SCALE, frames[0].shape[0] * GIF_SCALE)
  images = [Image.fromarray(f).resize(size, Image.NEAREST) for f in frames]
  tmp = gif_temporary(path)
  images[0].save(
    tmp, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0
  )
  tmp.replace(path)  # readers never see half a GIF
  return path
