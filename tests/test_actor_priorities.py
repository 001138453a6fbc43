"""Ape-X on the actor's side: the epsilon ladder, and items inserted with their TD error.

A real collector's policy and observer write CartPole episodes into a real
Reverb table; every item's priority is checked against the n-step TD error
computed by hand (numpy) from the known linear Q-network and the recorded
trajectory, and its epsilon against the one the environment acted with.
"""

import threading

import numpy as np
import pytest
import reverb
from tf_agents.trajectories import time_step as ts

from dqnfleet.collector.collector import Collector
from dqnfleet.collector.driver import PipelinedDriver
from dqnfleet.collector.exploration import Exploration, epsilon_at, ladder
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import envs, priorities, specs
from dqnfleet.core.settings.config import CollectorConfig, EnvConfig, NetworkConfig
from dqnfleet.core.transport.security import PLAINTEXT
from support import free_port, replay_table

GAMMA, REWARD_SCALE, N = 0.9, 0.5, 3


def test_the_ladder_is_the_ape_x_formula():
  # Ape-X with 8 actors: 0.4^(1 + 7 i / 7) = 0.4^1 ... 0.4^8.
  np.testing.assert_allclose(ladder(8, 0.4, 7.0), [0.4 ** (1 + i) for i in range(8)])
  rungs = ladder(16, 0.4, 7.0)
  assert rungs[0] == pytest.approx(0.4) and rungs[-1] == pytest.approx(0.4**8)
  assert np.all(np.diff(rungs) < 0)


def test_each_episode_draws_its_epsilon_from_the_ladder():
  config = CollectorConfig(exploration="ladder", ladder_rungs=8, epsilon_start=1.0)
  exploration = Exploration(config, num_envs=4, seed=3)
  mid = np.full(4, ts.StepType.MID, np.int32)
  # Until a trained policy arrives, every environment explores at epsilon_start.
  assert exploration.before_step(mid).tolist() == [1.0] * 4
  exploration.update(fleet_steps=0, trained=True)
  rungs = ladder(8, 0.4, 7.0).astype(np.float32)
  seen = set()
  for _ in range(200):
    before = exploration.before_step(mid).copy()
    assert np.isin(before, rungs).all()
    # Within an episode the epsilon stays; at its end (LAST) only that environment redraws.
    assert exploration.before_step(mid).tolist() == before.tolist()
    last = mid.copy()
    last[1] = ts.StepType.LAST
    after = exploration.before_step(last)
    assert after[[0, 2, 3]].tolist() == before[[0, 2, 3]].tolist()
    seen.add(float(after[1]))
  assert seen == set(rungs.tolist())  # 200 draws reach all 8 rungs


def test_the_decay_follows_the_fleet_steps_once_trained():
  config = CollectorConfig(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=1000)
  exploration = Exploration(config, num_envs=2, seed=0)
  exploration.update(fleet_steps=500, trained=False)
  assert exploration.epsilons.tolist() == [1.0, 1.0]
  exploration.update(fleet_steps=500, trained=True)
  np.testing.assert_allclose(exploration.epsilons, [0.55, 0.55])
  assert epsilon_at(5000, config) == pytest.approx(0.1)


class Recorder:
  """Each environment's transitions (s_t, a_t, r_t, d_t, s_t+1, epsilon), episode by episode."""

  def __init__(self, num_envs):
    self.current = [[] for _ in range(num_envs)]
    self.episodes = []

  def __call__(self, transition):
    time_step, action_step, next_time_step = transition
    for i in range(len(time_step.step_type)):
      if time_step.step_type[i] == ts.StepType.LAST:
        continue
      self.current[i].append(
        (
          np.array(time_step.observation[i]),
          int(action_step.action[i]),
          float(next_time_step.reward[i]),
          float(next_time_step.discount[i]),
          np.array(next_time_step.observation[i]),
          float(action_step.info["epsilon"][i]),
        )
      )
      if next_time_step.step_type[i] == ts.StepType.LAST:
        self.episodes.append(self.current[i])
        self.current[i] = []


def hand_computed_priorities(episodes, weights, bias):
  """{(s_t bytes, a_t): (priority, epsilon)} of every item of the finished episodes, in numpy."""
  q = lambda s: s @ weights + bias
  expected = {}
  for episode in episodes:
    for t, (s, a, *_, epsilon) in enumerate(episode):
      window = episode[t : t + N]
      # Past the episode's end the padding rows' discount 0 cuts the bootstrap.
      returns = q(window[-1][4]).max() if len(window) == N else 0.0
      for _, _, r, d, _, _ in reversed(window):
        returns = REWARD_SCALE * r + GAMMA * d * returns
      expected[(s.tobytes(), a)] = (abs(returns - q(s)[a]) + priorities.PRIORITY_FLOOR, epsilon)
  return expected


def test_collectors_insert_each_item_with_its_n_step_td_error():
  env_config = EnvConfig(env_id="CartPole-v1", n_step=N)
  env_specs = specs.env_specs(env_config)
  # A linear Q-network (no hidden layers): Q(s) = s W + b, known exactly.
  net = NetworkConfig(fc_layers=())
  table = replay_table(env_specs, sampler=reverb.selectors.Fifo(), max_times_sampled=1)
  server = reverb.Server([table], port=free_port())
  client = reverb.Client(f"localhost:{server.port}")
  config = CollectorConfig(
    replay_addresses=(f"localhost:{server.port}",),
    num_envs=2,
    seed=5,
    exploration="ladder",
    ladder_rungs=4,
  )
  stop = threading.Event()
  collector = Collector(env_config, net, config, "priorities-test", stop, PLAINTEXT)
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(4, 2)).astype(np.float32)
  bias = np.array([0.3, -0.2], np.float32)
  collector.network.set_weights([weights, bias])
  collector.exploration.update(0, trained=True)  # act on the ladder from the first step
  observer = ReplayObserver([client], env_specs, 2, lambda: 3, stop, source=9)
  observer.td_target = priorities.TdTarget(gamma=GAMMA, reward_scale=REWARD_SCALE)
  env = envs.BatchedEnvironment(env_config, num_envs=2, seed=5)
  recorder = Recorder(2)
  driver = PipelinedDriver(env, collector.act, lambda t, q: (recorder(t), observer(t, q)))
  driver.run(env.reset(), 300)  # CartPole episodes of a poor policy: a dozen or more end
  observer.close()
  env.close()

  expected = hand_computed_priorities(recorder.episodes, weights.astype(np.float64), bias)
  assert len(recorder.episodes) >= 4
  count = client.server_info()[specs.TABLE].current_size
  samples = list(
    client.sample(
      specs.TABLE, num_samples=count, emit_timesteps=False, unpack_as_table_signature=True
    )
  )
  server.stop()
  checked = 0
  epsilons = set()
  for sample in samples:
    s_t = np.asarray(sample.data["frames"][0]).tobytes()
    step = specs.unpack_step(sample.data["step"])
    key = (s_t, int(step["action"][0]))
    if key not in expected:
      continue  # an item of an episode still running when the run stopped
    priority, epsilon = expected[key]
    assert float(sample.info.priority) == pytest.approx(priority, rel=1e-4, abs=1e-5)
    assert float(step["epsilon"][0]) == pytest.approx(epsilon)
    epsilons.add(round(epsilon, 6))
    checked += 1
  assert checked == sum(len(e) for e in recorder.episodes) > 50
  # Items differ in priority (it is not the constant 1.0 of before) and carry the ladder's rungs.
  assert len({round(float(s.info.priority), 4) for s in samples}) > 10
  assert epsilons <= {round(float(e), 6) for e in ladder(4, 0.4, 7.0).astype(np.float32)}
  assert len(epsilons) >= 2
