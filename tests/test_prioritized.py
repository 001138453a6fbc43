"""Prioritized replay: replay's table samples by priority, and the trainer sends back the
|TD error| of every item it trained on, with importance weights in the loss."""

import threading

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.settings.config import (
  AgentConfig,
  EnvConfig,
  NetworkConfig,
  ReplayConfig,
  TrainerConfig,
)
from dqnfleet.replay.server import make_table
from dqnfleet.trainer.learner import importance_weights
from dqnfleet.trainer.trainer import Trainer
from support import free_port

ENV = EnvConfig(env_id="CartPole-v1", n_step=1)


def fill(client, items):
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(specs.env_specs(ENV)))
  rng = np.random.default_rng(0)
  for t in range(items + 1):
    writer.append(**specs.row(rng.normal(size=4).astype(np.float32), t % 2, 1.0, 1.0, 0, 0))
    if t:
      writer.create_item()
  writer.flush(0, timeout_ms=10_000)
  writer.close()


def test_the_trainer_updates_priorities_of_what_it_sampled(tmp_path):
  # A wide tolerance: neither the fill nor the sampling below waits on the rate limiter.
  config = ReplayConfig(
    prioritized=True, min_size=100, max_size=1000, samples_per_insert=1.0, rate_limit_tolerance=100
  )
  server = reverb.Server([make_table(ENV, config)], port=free_port())
  address = f"localhost:{server.port}"
  client = reverb.Client(address)
  fill(client, 200)
  trainer = Trainer(
    ENV,
    NetworkConfig(fc_layers=(32,)),
    AgentConfig(batch_size=16),
    TrainerConfig(replay_addresses=(address,), port=0, run_dir=str(tmp_path)),
    threading.Event(),
  )
  trainer.replay.connect()
  assert trainer.replay.prioritized  # read from the table's sampler, not configured twice
  trainer.replay.start()
  result = trainer.learner.step(20)
  assert result.steps == 20 and np.isfinite(result.loss) and not len(result.problems)
  priorities = [
    s.info.priority for s in client.sample(specs.TABLE, num_samples=200, emit_timesteps=False)
  ]
  server.stop()
  # Items enter with priority 1.0; trained-on ones now hold |TD error| + a floor.
  changed = [p for p in priorities if p != 1.0]
  assert changed and min(changed) > 0


def test_importance_weights_undo_the_sampling_bias():
  info = reverb.SampleInfo(
    key=tf.constant([1, 2, 3], tf.uint64),
    probability=tf.constant([0.5, 0.25, 0.25], tf.float64),
    table_size=tf.constant([4, 4, 4], tf.int64),
    priority=tf.constant([2.0, 1.0, 1.0], tf.float64),
    times_sampled=tf.constant([1, 1, 1], tf.int32),
  )
  # (N p)^-1: 0.5, 1, 1, scaled by the largest: the over-sampled item weighs half.
  np.testing.assert_allclose(importance_weights(info, 1.0).numpy(), [0.5, 1.0, 1.0])
  np.testing.assert_allclose(importance_weights(info, 0.0).numpy(), [1.0, 1.0, 1.0])
