"""Each frame is stored once, yet the trainer gets back exactly the transitions the
environments produced: (s, a, r, d, s') through a real Reverb server, the real
observer and the trainer's real dataset."""

import threading

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.policies import random_py_policy
from tf_agents.trajectories import time_step as ts

from dqnfleet.collector.driver import PipelinedDriver
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import envs, replay_io, specs
from dqnfleet.core.settings.config import EnvConfig
from dqnfleet.trainer.dataset import make_dataset
from support import acted, free_port, replay_table


class Recorder:
  """Remembers every environment's transitions, episode by episode."""

  def __init__(self, num_envs):
    self.current = [[] for _ in range(num_envs)]
    self.episodes = []
    self.count = 0

  def __call__(self, transition):
    time_step, action_step, next_time_step = transition
    for i in range(len(time_step.step_type)):
      if time_step.step_type[i] == ts.StepType.LAST:
        continue
      self.count += 1
      self.current[i].append(
        (
          np.asarray(time_step.observation[i]).tobytes(),
          int(action_step.action[i]),
          float(next_time_step.reward[i]),
          float(next_time_step.discount[i]),
          np.asarray(next_time_step.observation[i]).tobytes(),
        )
      )
      if next_time_step.step_type[i] == ts.StepType.LAST:
        self.episodes.append(self.current[i])
        self.current[i] = []

  def n_step_keys(self, n):
    """What each n-step item must hold: {(s_t, a_t, s_t+n): [(n rewards, n discounts)]}.

    The last n-1 transitions of an episode are padded with reward 0 and
    discount 0; their final observation is never used, so it is keyed None.
    """
    keys = {}
    episodes = [(e, True) for e in self.episodes] + [(e, False) for e in self.current]
    for episode, finished in episodes:
      for t in range(len(episode)):
        window = episode[t : t + n]
        if len(window) < n and not finished:
          continue  # an unfinished episode's tail has no items yet
        rewards = tuple(w[2] for w in window) + (0.0,) * (n - len(window))
        discounts = tuple(w[3] for w in window) + (0.0,) * (n - len(window))
        final = window[-1][4] if len(window) == n else None
        keys.setdefault((episode[t][0], episode[t][1], final), []).append((rewards, discounts))
    return keys


def n_step_target(rewards, discounts, gamma) -> tuple[float, float]:
  """The n-step reward and discount TF-Agents' to_n_step_transition makes of n steps."""
  total, scale = 0.0, 1.0
  for r, d in zip(rewards, discounts):
    total += scale * r
    scale *= gamma * d
  return total, gamma ** (len(rewards) - 1) * float(np.prod(discounts))


@pytest.mark.parametrize(
  "env_id, n_step, steps",
  [("CartPole-v1", 1, 600), ("CartPole-v1", 3, 600), ("ALE/Breakout-v5", 3, 400)],
)
def test_sampled_transitions_are_exactly_the_collected_ones(env_id, n_step, steps):
  config = EnvConfig(env_id=env_id, n_step=n_step)
  env_specs = specs.env_specs(config)
  server = reverb.Server([replay_table(env_specs, max_size=100_000)], port=free_port())
  client = reverb.Client(f"localhost:{server.port}")
  env = envs.BatchedEnvironment(config, num_envs=3, seed=7)
  observer = ReplayObserver([client], env_specs, 3, lambda: 42, threading.Event(), source=1234)
  recorder = Recorder(3)
  policy = random_py_policy.RandomPyPolicy(env.time_step_spec(), env.action_spec(), outer_dims=(3,))
  act = lambda t: acted(policy.action(t).action, env_specs.num_actions)
  driver = PipelinedDriver(env, act, lambda t, q: (recorder(t), observer(t, q)))
  driver.run(env.reset(), steps)
  driver.flush()
  observer.close()  # flushes every pending item
  env.close()

  info = client.server_info()[specs.TABLE]
  assert recorder.count == observer.steps_observed
  unfinished = sum(min(n_step - 1, len(episode)) for episode in recorder.current)
  assert info.current_size == observer.items_written == recorder.count - unfinished > 0
  expected = recorder.n_step_keys(n_step)
  # Several episodes ended (CartPole) or lives were played (Breakout) on the way.
  batch = 64
  gamma = 0.9
  dataset = make_dataset(f"localhost:{server.port}", env_specs, batch, 1, gamma)
  for (first, action, last), versions, _, items in dataset.take(10):  # noqa: B007 (read after)
    assert not items.numpy()[:, 1].any()  # every collected item is valid
    assert (
      first.observation.shape == last.observation.shape == (batch, *env_specs.observation.shape)
    )
    for b in range(batch):
      s_t, a_t = first.observation[b].numpy().tobytes(), int(action.action[b])
      # A padded item's final observation is keyed None (it is never used).
      windows = expected.get((s_t, a_t, last.observation[b].numpy().tobytes()), [])
      windows = windows + expected.get((s_t, a_t, None), [])
      targets = [n_step_target(r, d, gamma) for r, d in windows]
      got = (float(last.reward[b]), float(last.discount[b]))
      assert any(np.allclose(got, t, rtol=1e-6) for t in targets), (
        f"item {b} is no transition the environments produced"
      )
  assert set(versions.numpy()) == {42}
  server.stop()


def test_a_frame_stack_is_not_stored_twice():
  """Per transition the table holds one new 84x84 frame, not two 84x84x4 stacks."""
  config = EnvConfig(env_id="ALE/Breakout-v5")
  env_specs = specs.env_specs(config)
  signature = specs.replay_signature(env_specs)
  assert signature["frames"].shape == (4 + 3, 84, 84)  # s_t ... s_t+3 share their frames
  assert set(signature) == {"frames", "step"}  # every column costs bookkeeping per item
  assert env_specs.observation.shape == (4, 84, 84)  # frames stacked first, as stored
  obs = np.arange(84 * 84 * 4, dtype=np.int64).reshape(1, 4, 84, 84) % 251
  frames = np.stack(env_specs.frames_of(obs[0]) + [np.full((84, 84), 7)])[None].astype(np.uint8)
  first = replay_io.observation(tf.constant(frames), 4, 0).numpy()
  second = replay_io.observation(tf.constant(frames), 4, 1).numpy()
  np.testing.assert_array_equal(first, obs.astype(np.uint8))
  np.testing.assert_array_equal(second[0, :3], obs[0, 1:].astype(np.uint8))
  np.testing.assert_array_equal(second[0, 3], np.full((84, 84), 7, np.uint8))


def test_the_table_signature_declares_dtypes_and_still_names_its_layout():
  """Any shape passes Reverb's sampler (the trainer checks shapes itself); the
  layout check still tells environments and n-step settings apart, for new
  tables and for checkpoints saved with exact shapes."""
  breakout = specs.env_specs(EnvConfig(env_id="ALE/Breakout-v5"))
  table = specs.table_signature(breakout)
  assert all(spec.shape.rank is None for spec in table.values())
  assert {k: s.dtype for k, s in table.items()} == {
    k: s.dtype for k, s in specs.replay_signature(breakout).items()
  }
  assert specs.signature_mismatch(table, breakout) is None
  assert specs.signature_mismatch(specs.replay_signature(breakout), breakout) is None
  one_step = specs.env_specs(EnvConfig(env_id="ALE/Breakout-v5", n_step=1))
  mismatch = specs.signature_mismatch(table, one_step)
  assert "frames uint8[7, 84, 84]" in mismatch and "frames uint8[5, 84, 84]" in mismatch
  cartpole = specs.env_specs(EnvConfig(env_id="CartPole-v1"))
  assert specs.signature_mismatch(table, cartpole) is not None


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
