"""The gymnasium -> TF-Agents adapter on real ALE and classic-control environments."""

import numpy as np
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl import envs, specs
from dqnfleet.core.settings.config import EnvConfig


def run_random(env, steps, seed=0):
  rng = np.random.default_rng(seed)
  out = [env.reset()]
  n = env.action_spec().maximum + 1
  for _ in range(steps):
    out.append(env.step(rng.integers(0, n, env.batch_size)))
  return out


def test_breakout_is_preprocessed_for_dqn_and_batched():
  env = envs.BatchedEnvironment(EnvConfig(env_id="ALE/Breakout-v5"), num_envs=2, seed=3)
  assert env.batched and env.batch_size == 2
  assert env.observation_spec().shape == (4, 84, 84) and env.observation_spec().dtype == np.uint8
  assert env.action_spec().maximum == 3
  steps = run_random(env, 600)
  env.close()
  first = steps[0]
  assert (first.step_type == ts.StepType.FIRST).all()
  # A reset observation: the first screen newest, black padding before it
  # (ale-py's native frame stack), frames stacked first.
  assert first.observation[0, 3].any() and not first.observation[0, :3].any()
  # Consecutive observations of an episode share 3 of their 4 frames: every
  # MID step's with the step before it (FIRST or MID), in both environments.
  shared = 0
  for before, after in zip(steps, steps[1:]):
    for i in np.nonzero(after.step_type == ts.StepType.MID)[0]:
      np.testing.assert_array_equal(before.observation[i, 1:], after.observation[i, :3])
      shared += 1
  assert shared >= 0.9 * 600 * env.batch_size, shared  # episodes last hundreds of steps
  rewards = np.concatenate([s.reward for s in steps])
  assert set(np.unique(rewards)) <= {0.0, 1.0}  # clipped for training
  # Every LAST is followed by FIRST, with the finished episode reported.
  types = np.stack([s.step_type for s in steps])
  for t, i in zip(*np.nonzero(types[:-1] == ts.StepType.LAST)):
    assert types[t + 1, i] == ts.StepType.FIRST
  assert len(env.finished_episodes) == int((types == ts.StepType.LAST).sum()) > 0


def test_life_loss_cuts_the_bootstrap_without_ending_the_episode():
  config = EnvConfig(env_id="ALE/Breakout-v5", terminal_on_life_loss=True)
  env = envs.BatchedEnvironment(config, num_envs=1, seed=5)
  steps = run_random(env, 800)
  env.close()
  zero_discount_mid = [s for s in steps if s.step_type[0] == ts.StepType.MID and s.discount[0] == 0]
  assert zero_discount_mid, "a lost life should give discount 0 on a MID step"


def test_rewards_are_clipped_for_training_and_returns_are_not():
  # Space Invaders pays 5 to 30 points per alien, so clipping shows at once.
  config = EnvConfig(env_id="ALE/SpaceInvaders-v5")
  train = envs.BatchedEnvironment(config, num_envs=1, seed=2, training=True)
  evaluation = envs.BatchedEnvironment(config, num_envs=1, seed=2, training=False)
  train_steps, eval_steps = run_random(train, 300, seed=9), run_random(evaluation, 300, seed=9)
  train.close()
  evaluation.close()
  clipped = np.concatenate([s.reward for s in train_steps])
  raw = np.concatenate([s.reward for s in eval_steps])
  assert set(np.unique(clipped)) <= {0.0, 1.0} and raw.max() >= 5
  np.testing.assert_array_equal(np.sign(raw), clipped)  # same seed, same actions


def test_classic_control_observations_are_float_vectors():
  env = envs.BatchedEnvironment(EnvConfig(env_id="CartPole-v1"), num_envs=4, seed=1)
  steps = run_random(env, 200)
  env.close()
  assert env.observation_spec().shape == (4,) and steps[5].observation.dtype == np.float32
  returns = [r for _, r, _ in env.finished_episodes]
  lengths = [n for _, _, n in env.finished_episodes]
  assert returns == [float(n) for n in lengths]  # CartPole: +1 per step, unclipped
  assert 5 < np.mean(returns) < 60  # a random policy lasts about 22 steps


def test_native_atari_frames_match_gymnasiums_preprocessing_and_the_replay_layout():
  """ale-py's C++ vector env gives the frames gymnasium's Python wrappers give (84x84
  grey, frame skip 4 with max-pooling), in the layout the replay table stores."""
  config = EnvConfig(env_id="ALE/Breakout-v5", noop_max=0)  # no random starts: comparable
  native = envs.BatchedEnvironment(config, num_envs=2, seed=11)
  python = envs.BatchedEnvironment(config, num_envs=2, seed=11, native=False)
  assert type(native._vec).__name__ == "AtariVectorEnv"
  assert native.observation_spec() == python.observation_spec()
  env_specs = specs.env_specs(config)
  assert env_specs.frame.shape == native.observation_spec().shape[1:] == (84, 84)
  rng = np.random.default_rng(4)
  a, b = native.reset(), python.reset()
  compared = 0
  for t in range(120):
    action = rng.integers(0, 4, 2)
    a, b = native.step(action), python.step(action)
    np.testing.assert_array_equal(a.step_type, b.step_type)
    np.testing.assert_array_equal(a.reward, b.reward)
    if t >= env_specs.stack:  # the stacks' initial padding differs, every real frame agrees
      np.testing.assert_array_equal(a.observation, b.observation)
      compared += 1
    # What the observer stores per row is the newest frame of the observation.
    np.testing.assert_array_equal(env_specs.newest_frames(a.observation), a.observation[:, -1])
  native.close()
  python.close()
  assert compared > 100
