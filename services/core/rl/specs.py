"""Specs shared by all services: the environment's, and the replay item layout.

Replay item layout. An Atari observation stacks the last k=4 frames, so two
consecutive observations share k-1 frames; storing (obs, next_obs) pairs would
keep every frame 2k = 8 times. Instead each environment step appends ONE row
to its environment's Reverb trajectory writer, holding one new frame only:

    episode start: k rows, the frames of s_0 (scalars are padding)
    transition t:  frame = newest frame of s_t+1, action a_t, reward r_t,
                   discount d_t, policy_version of the policy that chose a_t,
                   collector = source_id() of the collector that wrote it,
                   epsilon = the exploration rate a_t was chosen with

and the item for transition t references the last k+1 rows' frames (Reverb
chunks are shared between items, so each frame is stored once) and the last
row's scalars:

    item:   frames[k+1] (s_t = frames[0:k], s_t+1 = frames[1:k+1]),
            step = (action, reward, discount, policy_version, collector, epsilon)

With n-step returns (n > 1) the item for transition t is created once row
t+n-1 is written: it references the last k+n frames (s_t ... s_t+n) and the
last n rows' scalars (r_t ... r_t+n-1 and their discounts), from which the
trainer computes the n-step target. When an episode ends, n-1 padding rows
(the last frame again, reward 0, discount 0) close the items of its last
transitions; a time-limit truncation is therefore treated as terminal for
the last n-1 transitions of such an episode (one in 27,000 agent steps).

The six scalars travel packed in one float64 vector, `step`: Reverb keeps
bookkeeping per column of every item, and with one column per scalar that,
not the frames (about 80 bytes each, compressed in chunks of 32 rows), was
most of a transition's memory: 2,256 bytes per Breakout transition with six
columns, 1,401 with two (docs/performance.md). float64 holds each scalar
exactly: actions, versions and collector ids are integers below 2**53, and
rewards, discounts and epsilons are float32.

A state-vector environment is the same with k=1: frames[2] = (s_t, s_t+1).
The signature depends only on the environment settings, so the replay server
derives it without waiting for a collector or the trainer.

This module declares the layout; core/rl/replay_io.py writes it (RowWriter:
which rows an item references) and reads it back (decode: the observations
s_t and s_t+n and the step scalars), for collectors, trainer and tests alike.
"""

import dataclasses
import functools
import zlib

import numpy as np
import tensorflow as tf
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl import envs
from dqnfleet.core.settings.config import EnvConfig, is_atari

TABLE = "transitions"
# The scalars of a transition and their dtypes, in their order in the packed
# `step` vector.
STEP_FIELDS = {
  "action": tf.int64,
  "reward": tf.float32,
  "discount": tf.float32,
  "policy_version": tf.int64,
  "collector": tf.int64,
  "epsilon": tf.float32,
}
# What one row of a trajectory writer holds.
ROW_COLUMNS = ("frame", "step")


@dataclasses.dataclass(frozen=True)
class EnvSpecs:
  """What every service needs to know about the environment."""

  observation: array_spec.ArraySpec  # what the policy sees: [k, H, W], frames stacked first
  action: array_spec.BoundedArraySpec
  frame: array_spec.ArraySpec  # one row's slice of an observation
  stack: int  # frames per observation (1: state vectors)
  n_step: int = 1  # transitions per replay item (n-step returns)

  @property
  def time_step(self) -> ts.TimeStep:
    return ts.time_step_spec(self.observation)

  @property
  def num_actions(self) -> int:
    return int(self.action.maximum) + 1

  def newest_frames(self, observations: np.ndarray) -> np.ndarray:
    """The newest frame of each of a batch of observations, [E, *frame], contiguous."""
    return np.ascontiguousarray(observations[:, -1] if self.stack > 1 else observations)

  def frames_of(self, observation: np.ndarray) -> list[np.ndarray]:
    """The frames of one (unbatched) observation, oldest first."""
    if self.stack == 1:
      return [observation]
    return list(observation)


@functools.cache
def _specs_for(env_id: str, frame_stack: int, noop_max: int, n_step: int) -> EnvSpecs:
  env = envs.BatchedEnvironment(
    EnvConfig(env_id=env_id, frame_stack=frame_stack, noop_max=noop_max), num_envs=1, seed=0
  )
  try:
    obs, act = env.observation_spec(), env.action_spec()
  finally:
    env.close()
  if is_atari(env_id):
    frame = array_spec.ArraySpec(obs.shape[1:], obs.dtype, "frame")
    return EnvSpecs(obs, act, frame, frame_stack, n_step)
  return EnvSpecs(obs, act, array_spec.ArraySpec(obs.shape, obs.dtype, "frame"), 1, n_step)


def env_specs(config: EnvConfig) -> EnvSpecs:
  return _specs_for(config.env_id, config.frame_stack, config.noop_max, config.n_step)


def replay_signature(specs: EnvSpecs) -> dict[str, tf.TensorSpec]:
  """The replay table's signature: one transition, frames stored once."""
  return {
    "frames": tf.TensorSpec(
      (specs.stack + specs.n_step,) + specs.frame.shape, tf.as_dtype(specs.frame.dtype), "frames"
    ),
    "step": tf.TensorSpec((specs.n_step, len(STEP_FIELDS)), tf.float64, "step"),
  }


def table_signature(specs: EnvSpecs) -> dict[str, tf.TensorSpec]:
  """The signature the replay table is created with: the dtypes, any shape.

  Reverb 0.14's server stores any item a client writes without checking it
  against the table's signature, and its sampler checks each sampled item
  against that signature: one wrong-shaped item fails the trainer's dataset
  with an error that does not say which item it was, so nothing could
  delete it. Declared with any shape, such an item reaches the trainer,
  which checks shapes itself where the item's key is known
  (trainer/dataset.py). Each spec's name keeps the exact shape, so a table
  still tells which layout it was made for (signature_mismatch).
  """
  return {
    name: tf.TensorSpec(None, spec.dtype, f"{name}{list(spec.shape)}")
    for name, spec in replay_signature(specs).items()
  }


def _declared_shape(spec: tf.TensorSpec) -> list | None:
  if spec.shape.rank is not None:  # exact signatures (older checkpoints, tests)
    return spec.shape.as_list()
  _, bracket, dims = (spec.name or "").partition("[")
  return [int(d) for d in dims.rstrip("]").split(",") if d.strip()] if bracket else None


def describe_signature(signature) -> str:
  return ", ".join(
    f"{name} {tf.as_dtype(spec.dtype).name}{_declared_shape(spec)}"
    for name, spec in sorted(signature.items())
  )


def signature_mismatch(signature, env_specs: EnvSpecs) -> str | None:
  """Why a replay table's signature is not this environment's layout (None if it is)."""
  ours = replay_signature(env_specs)
  if signature is None or (
    set(signature) == set(ours)
    and all(
      _declared_shape(signature[k]) == ours[k].shape.as_list()
      and signature[k].dtype == ours[k].dtype
      for k in ours
    )
  ):
    return None
  return f"the table holds {describe_signature(signature)}; this needs {describe_signature(ours)}"


def pack_step(action, reward, discount, policy_version, collector, epsilon=0.0) -> np.ndarray:
  """One row's scalars as the `step` vector of the replay layout."""
  return np.array(
    [action, reward, discount, policy_version, collector, np.float32(epsilon)], np.float64
  )


def pack_steps(actions, rewards, discounts, policy_version, collector, epsilons) -> np.ndarray:
  """`pack_step` for a batch of environments at once: [E, 6]."""
  steps = np.empty((len(actions), len(STEP_FIELDS)), np.float64)
  steps[:, 0], steps[:, 1], steps[:, 2] = actions, rewards, discounts
  steps[:, 3], steps[:, 4] = policy_version, collector
  steps[:, 5] = np.asarray(epsilons, np.float32)
  return steps


def unpack_step(step) -> dict[str, tf.Tensor]:
  """`step` vectors [..., 6] -> each scalar field [...] in its own dtype."""
  step = tf.convert_to_tensor(step, tf.float64)
  return {name: tf.cast(step[..., i], dtype) for i, (name, dtype) in enumerate(STEP_FIELDS.items())}


def row(frame, action, reward, discount, policy_version, collector, epsilon=0.0) -> dict:
  """One trajectory-writer row: a frame and the scalars of the step that produced it."""
  return {
    "frame": frame,
    "step": pack_step(action, reward, discount, policy_version, collector, epsilon),
  }


def padding_row(frame, policy_version, collector, epsilon) -> dict:
  """A row after an episode's end: no reward, no bootstrap (closes n-step items)."""
  return row(frame, 0, 0.0, 0.0, policy_version, collector, epsilon)


def source_id(collector_id: str) -> int:
  """The number that marks a collector's items in replay (a hash of its id)."""
  return zlib.crc32(collector_id.encode())
