"""`dqnfleet export`: a greedy SavedModel that plain TensorFlow loads and acts with."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import tensorflow as tf

from dqnfleet.core.policy import store
from dqnfleet.core.rl import envs, networks, specs
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig
from support import dqnfleet, start_trainer_without_data, wait_until

# Runs in a fresh interpreter: only TensorFlow and numpy, no dqnfleet, TF-Agents
# or TF Probability, as for someone who received just the exported folder.
PLAIN_TENSORFLOW = """
import collections, json, sys
import numpy as np, tensorflow as tf
model, observations, out = sys.argv[1:]
policy = tf.saved_model.load(model)
TimeStep = collections.namedtuple("TimeStep", "step_type reward discount observation")
obs = np.load(observations)
n = len(obs)
step = TimeStep(np.ones(n, np.int32), np.zeros(n, np.float32), np.ones(n, np.float32), obs)
actions = policy.action(step).action.numpy()
foreign = sorted({m.split(".")[0] for m in sys.modules}
                 & {"dqnfleet", "tf_agents", "tensorflow_probability", "gymnasium", "gym"})
json.dump({"actions": actions.tolist(), "dtype": actions.dtype.name, "foreign": foreign,
           "train_step": int(policy.get_train_step()),
           "env_id": policy.get_metadata()["env_id"].numpy().decode()}, open(out, "w"))
"""


def act_with_plain_tensorflow(model, observations: np.ndarray, tmp_path) -> dict:
  np.save(tmp_path / "observations.npy", observations)
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      PLAIN_TENSORFLOW,
      str(model),
      str(tmp_path / "observations.npy"),
      str(tmp_path / "acted.json"),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  acted = json.loads((tmp_path / "acted.json").read_text())
  assert acted["foreign"] == [], f"loading the SavedModel imported {acted['foreign']}"
  return acted


def greedy_actions(version_dir, observations: np.ndarray) -> np.ndarray:
  """What the published Q-network itself prefers, computed here with dqnfleet."""
  _, _, network, _ = store.load(version_dir)
  q_values, _ = network(tf.constant(observations))
  return np.argmax(q_values.numpy(), axis=-1)


def publish_untrained(root, env_id: str, version: int, net: NetworkConfig):
  env = EnvConfig(env_id=env_id)
  tf.keras.utils.set_random_seed(version)  # the same weights on every run
  network = networks.q_net(specs.env_specs(env), net)
  return store.publish(root / "policies", version, network, env, net, keep=1)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
  return publish_untrained(
    tmp_path_factory.mktemp("cartpole"), "CartPole-v1", 42, NetworkConfig(fc_layers=(256, 256))
  )


def cartpole_observations(count: int) -> np.ndarray:
  """Real CartPole states: random play from a few seeded starts."""
  env = gym.make("CartPole-v1")
  rng = np.random.default_rng(0)
  observations, (obs, _) = [], env.reset(seed=0)
  while len(observations) < count:
    observations.append(obs)
    obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
    if terminated or truncated:
      obs, _ = env.reset(seed=len(observations))
  env.close()
  return np.asarray(observations, np.float32)


def test_a_cartpole_export_acts_like_its_q_network_in_plain_tensorflow(cartpole, tmp_path):
  out = tmp_path / "exported" / "cartpole"
  result = dqnfleet("export", "--policy", str(cartpole.parent), "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {out}" in result.stdout and "v42" in result.stdout
  assert "CartPole-v1" in result.stdout
  assert (out / "saved_model.pb").exists()
  # Nothing else is left next to it (the temporary directory was renamed).
  assert sorted(p.name for p in out.parent.iterdir()) == ["cartpole"]
  info = json.loads((out / "dqnfleet_export.json").read_text())
  assert info["policy_version"] == 42 and info["env_id"] == "CartPole-v1"
  assert info["observation_shape"] == [4] and info["observation_dtype"] == "float32"
  assert info["num_actions"] == 2 and info["source"] == str(cartpole)

  observations = cartpole_observations(200)
  expected = greedy_actions(cartpole, observations)
  # Otherwise a policy stuck on one action would pass.
  assert set(expected) == {0, 1}, "the test network should prefer each action somewhere"
  acted = act_with_plain_tensorflow(out, observations, tmp_path)
  assert acted["dtype"] == "int64"
  assert set(acted["actions"]) <= {0, 1}
  np.testing.assert_array_equal(acted["actions"], expected)
  assert acted["train_step"] == 42 and acted["env_id"] == "CartPole-v1"


def test_a_breakout_export_acts_on_the_projects_own_observations(tmp_path):
  version_dir = publish_untrained(tmp_path / "run", "ALE/Breakout-v5", 0, NetworkConfig())
  out = tmp_path / "breakout"
  result = dqnfleet("export", "--policy", str(version_dir), "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ALE/Breakout-v5" in result.stdout
  info = json.loads((out / "dqnfleet_export.json").read_text())
  assert info["observation_shape"] == [4, 84, 84] and info["observation_dtype"] == "uint8"
  assert info["num_actions"] == 4 and info["frame_stack"] == 4

  env = envs.BatchedEnvironment(
    EnvConfig(env_id="ALE/Breakout-v5"), num_envs=2, seed=1, training=False
  )
  try:
    time_step = env.reset()
    for _ in range(30):  # past the reset, so all four frames show the game
      time_step = env.step(np.array([1, 3]))
  finally:
    env.close()
  observations = time_step.observation
  assert observations.shape == (2, 4, 84, 84) and observations.dtype == np.uint8
  assert observations[:, 0].any()
  acted = act_with_plain_tensorflow(out, observations, tmp_path)
  assert all(0 <= a < 4 for a in acted["actions"]) and len(acted["actions"]) == 2
  np.testing.assert_array_equal(acted["actions"], greedy_actions(version_dir, observations))


def test_a_non_empty_out_is_refused_and_left_alone(cartpole, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  result = dqnfleet("export", "--policy", str(cartpole), "--out", str(out))
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"--out {out} exists and is not empty" in result.stderr
  assert "an empty one" in result.stderr
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
  assert (out / "notes.txt").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
  version_dir = publish_untrained(tmp_path / "run", "CartPole-v1", 5, NetworkConfig((8,)))
  for weights in version_dir.glob(f"{store.WEIGHTS_PREFIX}.*"):
    weights.unlink()
  out_parent = tmp_path / "out"
  result = dqnfleet("export", "--policy", str(version_dir), "--out", str(out_parent / "model"))
  assert result.returncode != 0
  assert not out_parent.exists() or not any(out_parent.iterdir())


def test_export_fetches_the_latest_policy_from_a_trainer(services, tmp_path):
  run_dir = tmp_path / "run"
  trainer, trainer_port = start_trainer_without_data(services, run_dir)
  # A trainer publishes its untrained network (v0) before it waits for data.
  wait_until(lambda: "waiting for data" in trainer.log(), 120, "the trainer to publish v0")
  out = tmp_path / "from-trainer"
  result = dqnfleet("export", "--policy", f"localhost:{trainer_port}", "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  info = json.loads((out / "dqnfleet_export.json").read_text())
  assert info["policy_version"] == 0 and info["source"] == f"localhost:{trainer_port}"
  observations = cartpole_observations(50)
  acted = act_with_plain_tensorflow(out, observations, tmp_path)
  published = store.version_dir(run_dir / "policies", 0)
  np.testing.assert_array_equal(acted["actions"], greedy_actions(published, observations))


def test_a_policy_of_a_channels_last_atari_network_is_refused_by_name(tmp_path):
  version_dir = publish_untrained(tmp_path / "run", "ALE/Breakout-v5", 7, NetworkConfig())
  manifest = json.loads((version_dir / "manifest.json").read_text())
  assert manifest["observation_shape"] == [4, 84, 84]
  del manifest["observation_shape"]  # what dqnfleet wrote before frames were stacked first
  with pytest.raises(ValueError, match=r"policy v7 .*stacked last \(\[84, 84, 4\]\)"):
    store.configs_of(manifest)
  assert store.configs_of(json.loads((version_dir / "manifest.json").read_text()))
