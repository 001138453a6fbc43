"""n-step targets on a hand-made trajectory: the real observer writes it into a real
Reverb table, and the trainer's dataset turns its items into the n-step transitions
DqnAgent(n_step_update=n) trains on, with the targets computed here by hand."""

import threading

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.trajectories import time_step as ts

from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import specs
from dqnfleet.core.settings.config import EnvConfig
from dqnfleet.trainer.dataset import to_transition
from support import acted, free_port, replay_table

GAMMA = 0.9


def observation(t):
  return np.full((1, 4), t, np.float32)  # one environment; s_t holds the number t


def write_episode(observer, rewards, discounts):
  """s_0 .. s_T with the given rewards and discounts; the last step is LAST."""
  step = ts.TimeStep(
    np.array([ts.StepType.FIRST], np.int32),
    np.zeros(1, np.float32),
    np.ones(1, np.float32),
    observation(0),
  )
  for t, (reward, discount) in enumerate(zip(rewards, discounts)):
    last = t == len(rewards) - 1
    nxt = ts.TimeStep(
      np.array([ts.StepType.LAST if last else ts.StepType.MID], np.int32),
      np.array([reward], np.float32),
      np.array([discount], np.float32),
      observation(t + 1),
    )
    observer((step, acted([t % 2], 2), nxt), None)
    step = nxt


def n_step_items(rewards, discounts, n):
  config = EnvConfig(env_id="CartPole-v1", n_step=n)
  env_specs = specs.env_specs(config)
  table = replay_table(env_specs, sampler=reverb.selectors.Fifo(), max_times_sampled=1)
  server = reverb.Server([table], port=free_port())
  client = reverb.Client(f"localhost:{server.port}")
  observer = ReplayObserver([client], env_specs, 1, lambda: 7, threading.Event(), source=1)
  write_episode(observer, rewards, discounts)
  observer.close()
  count = client.server_info()[specs.TABLE].current_size
  samples = list(
    client.sample(
      specs.TABLE, num_samples=count, emit_timesteps=False, unpack_as_table_signature=True
    )
  )
  server.stop()
  batch = tf.nest.map_structure(lambda *x: tf.stack(x), *[s.data for s in samples])
  transition, versions, _ = to_transition(reverb.ReplaySample(info=None, data=batch), 1, GAMMA)
  assert versions.numpy().tolist() == [7] * count
  return transition


def test_three_step_targets_bootstrap_from_the_third_next_state():
  rewards, discounts = [1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 0]
  first, action, last = n_step_items(rewards, discounts, 3)
  assert first.observation.shape == (6, 4)  # every transition got its item
  # Item t: s_t, a_t, then r_t + g r_t+1 + g^2 r_t+2 and a bootstrap from s_t+3.
  np.testing.assert_array_equal(first.observation[:, 0], [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(action.action, [0, 1, 0, 1, 0, 1])
  expected_returns = [
    1 + 0.9 * 2 + 0.81 * 3,
    2 + 0.9 * 3 + 0.81 * 4,
    3 + 0.9 * 4 + 0.81 * 5,
    4 + 0.9 * 5 + 0.81 * 6,
    5 + 0.9 * 6,
    6,
  ]
  np.testing.assert_allclose(last.reward, expected_returns, rtol=1e-6)
  # TF-Agents stores gamma^(n-1) * prod(d); DqnAgent multiplies by gamma once more.
  np.testing.assert_allclose(last.discount * GAMMA, [0.729, 0.729, 0.729, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(last.observation[:3, 0], [3, 4, 5])


def test_a_lost_life_inside_the_window_stops_the_sum_and_the_bootstrap():
  # discount 0 at t=1 (a lost life): nothing after it counts for items 0 and 1.
  rewards, discounts = [1, 2, 3, 4, 5], [1, 0, 1, 1, 0]
  _, _, last = n_step_items(rewards, discounts, 3)
  np.testing.assert_allclose(
    last.reward, [1 + 0.9 * 2, 2, 3 + 0.9 * 4 + 0.81 * 5, 4 + 0.9 * 5, 5], rtol=1e-6
  )
  np.testing.assert_array_equal(last.discount, [0, 0, 0, 0, 0])


@pytest.mark.parametrize("n", [1, 2])
def test_episodes_shorter_than_n_and_one_step_items(n):
  rewards, discounts = [1, 2, 3], [1, 1, 0]
  first, _, last = n_step_items(rewards, discounts, n)
  assert first.observation.shape == last.observation.shape == (3, 4)
  if n == 1:  # plain DQN: r_t and the bootstrap from s_t+1
    np.testing.assert_allclose(last.reward, [1, 2, 3])
    np.testing.assert_allclose(last.discount * GAMMA, [0.9, 0.9, 0], rtol=1e-6)
    np.testing.assert_array_equal(last.observation[:, 0], [1, 2, 3])
  else:
    np.testing.assert_allclose(last.reward, [1 + 0.9 * 2, 2 + 0.9 * 3, 3], rtol=1e-6)
    np.testing.assert_allclose(last.discount * GAMMA, [0.81, 0, 0], rtol=1e-6)
