"""Each frame is stored once, yet the trainer gets back exactly the transitions the
environments produced: (s, a, r, d, s') through a real Reverb server, the real
observer and the trainer's real dataset."""
import threading

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.drivers import py_driver
from tf_agents.policies import random_py_policy
from tf_agents.trajectories import time_step as ts

from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core import envs, specs
from dqnfleet.core.config import EnvConfig
from dqnfleet.trainer.dataset import make_dataset

from conftest import free_port


class Recorder:
  """Remembers every transition the driver produced, keyed by its content."""

  def __init__(self):
    self.keys = set()  # identical transitions happen (Breakout's still frames): count apart
    self.count = 0

  def __call__(self, transition):
    time_step, action_step, next_time_step = transition
    for i in range(len(time_step.step_type)):
      if time_step.step_type[i] != ts.StepType.LAST:
        self.count += 1
        self.keys.add(key(time_step.observation[i], action_step.action[i],
                          next_time_step.reward[i], next_time_step.discount[i],
                          next_time_step.observation[i]))


def key(obs, action, reward, discount, next_obs):
  return (np.asarray(obs).tobytes(), int(action), float(reward), float(discount),
          np.asarray(next_obs).tobytes())


@pytest.mark.parametrize("env_id, steps", [("CartPole-v1", 600), ("ALE/Breakout-v5", 400)])
def test_sampled_transitions_are_exactly_the_collected_ones(env_id, steps):
  config = EnvConfig(env_id=env_id)
  env_specs = specs.env_specs(config)
  table = reverb.Table(specs.TABLE, reverb.selectors.Uniform(), reverb.selectors.Fifo(),
                       max_size=100_000, rate_limiter=reverb.rate_limiters.MinSize(1),
                       signature=specs.replay_signature(env_specs))
  server = reverb.Server([table], port=free_port())
  client = reverb.Client(f"localhost:{server.port}")
  env = envs.BatchedGymEnvironment(config, num_envs=3, seed=7)
  observer = ReplayObserver(client, env_specs, 3, lambda: 42, threading.Event(), source=1234)
  recorder = Recorder()
  policy = random_py_policy.RandomPyPolicy(env.time_step_spec(), env.action_spec(),
                                           outer_dims=(3,))
  driver = py_driver.PyDriver(env, policy, [], transition_observers=[recorder, observer],
                              max_steps=steps * 3)
  driver.run(env.reset())
  observer.close()  # flushes every pending item
  env.close()

  info = client.server_info()[specs.TABLE]
  assert info.current_size == observer.items_written == recorder.count > 0
  # Several episodes ended (CartPole) or lives were played (Breakout) on the way.
  batch = 64
  dataset = make_dataset(f"localhost:{server.port}", env_specs, batch, prefetch_batches=1)
  for experience, versions in dataset.take(10):
    obs = experience.observation.numpy()
    assert obs.shape[:2] == (batch, 2) and obs.shape[2:] == env_specs.observation.shape
    for b in range(batch):
      assert key(obs[b, 0], experience.action[b, 0], experience.reward[b, 0],
                 experience.discount[b, 0], obs[b, 1]) in recorder.keys
  assert set(versions.numpy()) == {42}
  server.stop()


def test_a_frame_stack_is_not_stored_twice():
  """Per transition the table holds one new 84x84 frame, not two 84x84x4 stacks."""
  config = EnvConfig(env_id="ALE/Breakout-v5")
  env_specs = specs.env_specs(config)
  signature = specs.replay_signature(env_specs)
  assert signature["frames"].shape == (5, 84, 84)  # s_t and s_t+1 share 3 of 4 frames
  assert set(signature) == {"frames", "step"}  # every column costs bookkeeping per item
  assert env_specs.observation.shape == (84, 84, 4)
  obs = np.arange(84 * 84 * 4, dtype=np.int64).reshape(1, 84, 84, 4) % 251
  frames = np.stack(env_specs.frames_of(obs[0]) + [np.full((84, 84), 7)])[None].astype(np.uint8)
  first, second = specs.split_frames(tf.constant(frames), 4)
  np.testing.assert_array_equal(first.numpy(), obs.astype(np.uint8))
  np.testing.assert_array_equal(second.numpy()[0, ..., :3], obs[0, ..., 1:].astype(np.uint8))
  np.testing.assert_array_equal(second.numpy()[0, ..., 3], np.full((84, 84), 7, np.uint8))


def test_packed_scalars_come_back_exactly():
  """The five scalars share one float64 column and lose nothing on the way."""
  reward = np.float32(0.1)  # not exactly representable: must survive float32 -> 64 -> 32
  step = specs.pack_step(17, reward, np.float32(0.99), 2**52 + 1, 2**32 - 1)
  fields = specs.unpack_step(np.stack([step, step]))
  assert fields["action"].dtype == tf.int64 and fields["policy_version"].dtype == tf.int64
  assert fields["reward"].dtype == tf.float32 and fields["collector"].dtype == tf.int64
  assert fields["action"].numpy().tolist() == [17, 17]
  assert fields["reward"].numpy()[0] == reward and fields["discount"].numpy()[0] == np.float32(0.99)
  assert fields["policy_version"].numpy()[0] == 2**52 + 1
  assert fields["collector"].numpy()[0] == 2**32 - 1
