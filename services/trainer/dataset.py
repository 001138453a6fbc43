"""Replay -> agent: batches of transitions sampled from Reverb over gRPC.

Items come in the replay layout of core/specs.py (frames stored once) and
leave as the [batch, n+1] `Trajectory` that TF-Agents' DqnAgent trains on.
"""
import threading

import reverb
import tensorflow as tf
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory

from dqnfleet.core import specs

# After this long without a sample, the dataset ends so the trainer can say
# why (table below its minimum, or the rate limiter waiting for collectors).
SAMPLE_TIMEOUT_MS = 5_000


def to_experience(sample: reverb.ReplaySample, stack: int):
  """A batch of n-step replay items -> (Trajectory [B, n+1], policy versions [B], info).

  DqnAgent(n_step_update=n) reads the first observation and action, the last
  observation, and the n rewards and discounts between them; the last
  column's reward, discount and action are placeholders it ignores.
  """
  observations = specs.observations(sample.data["frames"], stack)
  data = specs.unpack_step(sample.data["step"])  # each [B, n]
  mid = tf.fill(tf.shape(observations)[:2], ts.StepType.MID)
  extend = lambda x, value: tf.concat([x, tf.fill([tf.shape(x)[0], 1], value)], axis=1)
  experience = trajectory.Trajectory(
      step_type=mid,
      observation=observations,
      action=extend(data["action"], tf.constant(0, data["action"].dtype)),
      policy_info=(),
      next_step_type=mid,
      reward=extend(data["reward"], 0.0),
      discount=extend(data["discount"], 1.0))
  return experience, data["policy_version"][:, 0], sample.info


def item_problems(sample: reverb.ReplaySample, env_specs: specs.EnvSpecs) -> tf.Tensor:
  """Per item of a batch, 0 if its values are ones a collector writes, else what is wrong.

  Collectors write what the table's signature describes (their writers check
  it; Reverb 0.14's server does not). Any Reverb client can still write a NaN
  reward or an action the network has no output for, and one such item would
  crash every train step that samples it.
  """
  step = sample.data["step"]                                # [B, n, 5]
  every = lambda x: tf.reduce_all(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
  action, discount = step[..., 0], step[..., 2]
  checks = [
      every(tf.math.is_finite(step)),
      every((discount >= 0) & (discount <= 1)),
      every((action >= 0) & (action < env_specs.num_actions) & (action == tf.floor(action))),
  ]
  frames = sample.data["frames"]
  if frames.dtype.is_floating:  # state vectors; uint8 frames cannot be out of range
    checks.append(every(tf.math.is_finite(frames)))
  codes = [tf.where(ok, 0, i + 1) for i, ok in enumerate(checks)]
  return tf.reduce_max(tf.stack(codes), axis=0)


PROBLEMS = {1: "a step value is not finite", 2: "a discount is outside [0, 1]",
            3: "an action is not one of the environment's", 4: "an observation is not finite"}


class BadItems:
  """Keys of invalid items found while sampling, for the trainer to delete from replay."""

  def __init__(self):
    self._lock = threading.Lock()
    self._found: list[tuple[int, int]] = []  # (key, problem code)

  def record(self, keys, codes) -> bool:
    with self._lock:
      self._found.extend(zip(keys.numpy().tolist(), codes.numpy().tolist()))
    return True

  def take(self) -> list[tuple[int, int]]:
    with self._lock:
      found, self._found = self._found, []
    return found


def without_bad_items(sample: reverb.ReplaySample, env_specs: specs.EnvSpecs,
                      bad_items: BadItems) -> tuple[reverb.ReplaySample, tf.Tensor]:
  """(The batch with each invalid item reported and replaced by a valid one, all invalid?).

  Checked per batch, vectorised, so valid data costs a few cheap ops per
  batch; a batch with no valid item at all is dropped by the caller.
  """
  codes = item_problems(sample, env_specs)
  bad = codes > 0

  def replace():
    reported = tf.py_function(bad_items.record, [tf.boolean_mask(sample.info.key, bad),
                                                 tf.boolean_mask(codes, bad)], tf.bool)
    with tf.control_dependencies([reported]):
      first_valid = tf.argmin(tf.cast(bad, tf.int32), output_type=tf.int32)
      rows = tf.where(bad, first_valid, tf.range(tf.shape(bad)[0]))
      return tf.nest.map_structure(lambda x: tf.gather(x, rows), sample)

  return tf.cond(tf.reduce_any(bad), replace, lambda: sample), tf.reduce_all(bad)


def make_dataset(replay_address: str, env_specs: specs.EnvSpecs, batch_size: int,
                 prefetch_batches: int, bad_items: BadItems | None = None) -> tf.data.Dataset:
  """Batches of valid items; invalid ones are left out and reported to `bad_items`."""
  signature = specs.replay_signature(env_specs)
  dataset = reverb.TrajectoryDataset(
      server_address=replay_address, table=specs.TABLE,
      dtypes=tf.nest.map_structure(lambda s: s.dtype, signature),
      shapes=tf.nest.map_structure(lambda s: s.shape, signature),
      max_in_flight_samples_per_worker=2 * batch_size,
      rate_limiter_timeout_ms=SAMPLE_TIMEOUT_MS)
  bad_items = bad_items or BadItems()
  return (dataset.batch(batch_size, drop_remainder=True)
          .map(lambda sample: without_bad_items(sample, env_specs, bad_items))
          .filter(lambda sample, all_bad: tf.logical_not(all_bad))
          .map(lambda sample, _: to_experience(sample, env_specs.stack),
               num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(prefetch_batches))
