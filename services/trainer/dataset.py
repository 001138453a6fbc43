"""Replay -> agent: batches of transitions sampled from Reverb over gRPC.

Items come in the replay layout of core/specs.py (frames stored once) and
leave as the [batch, 2] `Trajectory` that TF-Agents' DqnAgent trains on.
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
  """A batch of replay items -> (Trajectory [B, 2], policy versions [B])."""
  obs, next_obs = specs.split_frames(sample.data["frames"], stack)
  data = specs.unpack_step(sample.data["step"])
  mid = tf.fill(tf.shape(data["action"]), ts.StepType.MID)
  pair = lambda first, second: tf.stack([first, second], axis=1)
  experience = trajectory.Trajectory(
      step_type=pair(mid, mid),
      observation=pair(obs, next_obs),
      action=pair(data["action"], data["action"]),
      policy_info=(),
      next_step_type=pair(mid, mid),
      # Only the first column's reward and discount are used: DQN's target is
      # r_t + gamma * d_t * Q(s_t+1).
      reward=pair(data["reward"], tf.zeros_like(data["reward"])),
      discount=pair(data["discount"], tf.ones_like(data["discount"])))
  return experience, data["policy_version"]


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
