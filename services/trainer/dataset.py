"""Replay -> agent: batches of transitions sampled from Reverb over gRPC.

Items come in the replay layout of core/specs.py (frames stored once) and
leave as the [batch, n+1] `Trajectory` that TF-Agents' DqnAgent trains on.
"""
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


def make_dataset(replay_address: str, env_specs: specs.EnvSpecs, batch_size: int,
                 prefetch_batches: int) -> tf.data.Dataset:
  signature = specs.replay_signature(env_specs)
  dataset = reverb.TrajectoryDataset(
      server_address=replay_address, table=specs.TABLE,
      dtypes=tf.nest.map_structure(lambda s: s.dtype, signature),
      shapes=tf.nest.map_structure(lambda s: s.shape, signature),
      max_in_flight_samples_per_worker=2 * batch_size,
      rate_limiter_timeout_ms=SAMPLE_TIMEOUT_MS)
  return (dataset.batch(batch_size, drop_remainder=True)
          .map(lambda sample: to_experience(sample, env_specs.stack),
               num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(prefetch_batches))
