"""`dqnfleet evaluate`: greedy episode returns of a published policy.

The policy comes from a directory (a run directory, its policies/ folder, or
one version's folder; the newest version is used) or from a trainer's gRPC
address (its latest version is fetched). Every environment counts only its
first episode of a round, so short episodes do not crowd out long ones.
"""
import json
import logging
import math
import pathlib
import tempfile

import numpy as np
import tensorflow as tf
from tf_agents.policies import py_tf_eager_policy

from dqnfleet.core import envs, networks, policy_store, rpc
from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.config import CommonConfig, EvaluateConfig
from dqnfleet.core.settings import ConfigError


LOAD_ATTEMPTS = 3


def resolve(policy: str, scratch: str) -> pathlib.Path:
  """The version directory that `policy` names, fetching it if it is an address."""
  path = pathlib.Path(policy)
  if path.exists():
    for candidate in (path, path / "policies"):
      if (candidate / policy_store.MANIFEST).exists():
        return candidate
      versions = policy_store.list_versions(candidate)
      if versions:
        return policy_store.version_dir(candidate, versions[-1])
    raise ConfigError(f"--policy {policy!r} holds no published policy (expected v<step>/ "
                      "folders with a manifest.json, or a run directory with policies/)")
  if ":" not in policy:
    raise ConfigError(f"--policy {policy!r} is neither an existing directory nor a host:port")
  with rpc.channel(policy) as channel:
    stub = fleet_pb2_grpc.PolicyServiceStub(channel)
    import grpc
    try:
      info = stub.GetLatestPolicy(fleet_pb2.GetLatestPolicyRequest(), timeout=30)
      return policy_store.fetch(stub, info, scratch)
    except grpc.RpcError as e:
      raise ConfigError(f"--policy {policy}: the trainer did not provide a policy "
                        f"({e.code().name}: {e.details()})") from None


def evaluate(path: pathlib.Path, config: EvaluateConfig) -> dict:
  env_config, env_specs, network, version = policy_store.load(path)
  policy = networks.greedy(env_specs, network)
  if config.epsilon > 0:
    epsilon = tf.Variable(config.epsilon, dtype=tf.float32, trainable=False)
    policy = networks.epsilon_greedy(env_specs, network, epsilon)
  policy = py_tf_eager_policy.PyTFEagerPolicy(policy, use_tf_function=True,
                                              batch_time_steps=False)
  returns = []
  num_envs = min(config.num_envs, config.episodes)
  for round_ in range(math.ceil(config.episodes / num_envs)):
    wanted = min(num_envs, config.episodes - len(returns))
    env = envs.BatchedGymEnvironment(env_config, wanted, config.seed + round_ * num_envs,
                                     training=False)
    done = {}
    try:
      time_step = env.reset()
      while len(done) < wanted:
        time_step = env.step(policy.action(time_step).action)
        while env.finished_episodes:
          index, episode_return, _ = env.finished_episodes.popleft()
          done.setdefault(index, episode_return)
    finally:
      env.close()
    returns.extend(done[i] for i in sorted(done))
  return {"env_id": env_config.env_id, "policy_version": version, "policy_path": str(path),
          "episodes": len(returns), "mean_return": float(np.mean(returns)),
          "std_return": float(np.std(returns)), "min_return": float(np.min(returns)),
          "max_return": float(np.max(returns)), "returns": returns}


def run(common: CommonConfig, config: EvaluateConfig) -> int:
  logging.basicConfig(level=getattr(logging, common.log_level))
  with tempfile.TemporaryDirectory(prefix="dqnfleet-eval-") as scratch:
    for attempt in range(LOAD_ATTEMPTS):
      path = resolve(config.policy, scratch)
      try:
        result = evaluate(path, config)
        break
      except (tf.errors.NotFoundError, FileNotFoundError):
        # A running trainer pruned the version while we loaded it: take the newest again.
        if attempt == LOAD_ATTEMPTS - 1:
          raise
  if config.json:
    print(json.dumps(result))
  else:
    print(f"{result['env_id']} policy v{result['policy_version']}: mean return "
          f"{result['mean_return']:.1f} (min {result['min_return']:.1f}, max "
          f"{result['max_return']:.1f}) over {result['episodes']} episodes")
  return 0
