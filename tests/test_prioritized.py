"""Prioritized replay: replay's table samples by priority, and the trainer sends back the
|TD error| of every item it trained on, with importance weights in the loss."""
import threading

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import specs
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, ReplayConfig, TrainerConfig
from dqnfleet.replay.server import make_table
from dqnfleet.trainer.dataset import make_dataset
from dqnfleet.trainer.learner import importance_weights
from dqnfleet.trainer.trainer import Trainer

from conftest import free_port

ENV = EnvConfig(env_id="CartPole-v1", n_step=1)


def fill(client, items):
  env_specs = specs.env_specs(ENV)
  rng = np.random.default_rng(0)
  with client.trajectory_writer(num_keep_alive_refs=2) as writer:
    for t in range(items + 1):
      writer.append(specs.row(rng.normal(size=4).astype(np.float32), t % 2, 1.0, 1.0, 0, 0))
      if t:
        writer.create_item(specs.TABLE, 1.0, specs.item(writer.history, env_specs.stack, 1))
    writer.flush()


def test_the_trainer_updates_priorities_of_what_it_sampled(tmp_path):
  # A wide tolerance: neither the fill nor the sampling below waits on the rate limiter.
  config = ReplayConfig(prioritized=True, min_size=100, max_size=1000, samples_per_insert=1.0,
                        rate_limit_tolerance=100)
  server = reverb.Server([make_table(ENV, config)], port=free_port())
  address = f"localhost:{server.port}"
  client = reverb.Client(address)
  fill(client, 200)
  trainer = Trainer(ENV, NetworkConfig(fc_layers=(32,)), AgentConfig(batch_size=16),
                    TrainerConfig(replay_address=address, port=0, run_dir=str(tmp_path)),
                    threading.Event())
  trainer._check_signature()
  assert trainer.prioritized  # read from the table's sampler, not configured twice
  iterator = iter(make_dataset(address, trainer.specs, 16, prefetch_batches=1))
  done, _, loss, _, _, problems = trainer._train(iterator, tf.constant(20))
  assert int(done) == 20 and np.isfinite(float(loss)) and not len(problems)
  priorities = [s.info.priority for s in client.sample(specs.TABLE, num_samples=200,
                                                        emit_timesteps=False)]
  server.stop()
  # Items enter with priority 1.0; trained-on ones now hold |TD error| + a floor.
  changed = [p for p in priorities if p != 1.0]
  assert changed and min(changed) > 0


def test_importance_weights_undo_the_sampling_bias():
  info = reverb.SampleInfo(key=tf.constant([1, 2, 3], tf.uint64),
                           probability=tf.constant([0.5, 0.25, 0.25], tf.float64),
                           table_size=tf.constant([4, 4, 4], tf.int64),
                           priority=tf.constant([2., 1., 1.], tf.float64),
                           times_sampled=tf.constant([1, 1, 1], tf.int32))
  # (N p)^-1: 0.5, 1, 1, scaled by the largest: the over-sampled item weighs half.
  np.testing.assert_allclose(importance_weights(info, 1.0).numpy(), [0.5, 1.0, 1.0])
  np.testing.assert_allclose(importance_weights(info, 0.0).numpy(), [1.0, 1.0, 1.0])
