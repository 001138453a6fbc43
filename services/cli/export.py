"""`dqnfleet export`: a published policy's greedy policy as a TensorFlow SavedModel.

The policy comes from the same places as `dqnfleet evaluate`'s (a directory or
a trainer's host:port). TF-Agents' PolicySaver writes it with an unknown batch
size, so plain TensorFlow loads and runs it without dqnfleet or TF-Agents:

    policy = tf.saved_model.load(out)
    policy.action(time_step).action        # time_step: a TimeStep namedtuple, batched

Next to the model, dqnfleet_export.json says where it came from and what it
expects (observation shape and dtype, number of actions). The SavedModel is
written into a hidden sibling of --out and renamed at the end, so a failed
export leaves no half-written model behind.
"""

import json
import logging
import os
import pathlib
import shutil
import tempfile

import tensorflow as tf

from dqnfleet.core.policy.client import load
from dqnfleet.core.settings.config import CommonConfig, ExportConfig
from dqnfleet.core.settings.flags import ConfigError
from dqnfleet.core.transport.security import Security

INFO_FILE = "dqnfleet_export.json"


def check_out(out: pathlib.Path) -> None:
  """Refuses an --out that would overwrite anything."""
  if out.is_dir():
    if any(out.iterdir()):
      raise ConfigError(
        f"--out {out} exists and is not empty; give a new directory or an "
        "empty one (nothing is overwritten)"
      )
  elif out.exists():
    raise ConfigError(
      f"--out {out} exists and is not a directory; give a new directory or an empty one"
    )


def greedy_policy(env_specs, network):
  """The policy that always takes the action of the highest Q-value."""
  from tf_agents.policies import greedy_policy as greedy
  from tf_agents.policies import q_policy
  from tf_agents.specs import tensor_spec

  time_step_spec = tensor_spec.from_spec(env_specs.time_step)
  action_spec = tensor_spec.from_spec(env_specs.action)
  return greedy.GreedyPolicy(q_policy.QPolicy(time_step_spec, action_spec, network))


def describe(env_config, env_specs, version: int, source: str) -> dict:
  obs = env_specs.observation
  return {
    "format": "tf-agents-policy-saver",
    "policy_version": version,
    "source": source,
    "env_id": env_config.env_id,
    "frame_stack": env_specs.stack,
    "observation_shape": list(obs.shape),
    "observation_dtype": obs.dtype.name,
    "num_actions": env_specs.num_actions,
    "action_dtype": env_specs.action.dtype.name,
    "greedy": True,
    # The restored function matches its input by structure: a namedtuple
    # called TimeStep with these fields, each with a leading batch axis.
    "time_step_fields": {
      "step_type": "int32",
      "reward": "float32",
      "discount": "float32",
      "observation": obs.dtype.name,
    },
    "load": "tf.saved_model.load(path).action(time_step).action, time_step = "
    "collections.namedtuple('TimeStep', 'step_type reward discount observation')"
    "(...) batched on the first axis",
  }


def save(env_config, env_specs, network, version: int, source: str, out: pathlib.Path) -> None:
  """Writes the SavedModel and its description into `out` atomically."""
  from tf_agents.policies import policy_saver

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    # The train step the model reports is the published version it came from.
    saver = policy_saver.PolicySaver(
      greedy_policy(env_specs, network),
      batch_size=None,
      train_step=tf.Variable(version, dtype=tf.int64, trainable=False),
      metadata={"env_id": tf.Variable(env_config.env_id, trainable=False)},
    )
    # `distribution` returns a TF Probability distribution: its type must be
    # registered to load the model at all, so plain TensorFlow could not.
    # The greedy policy's distribution says no more than its action.
    del saver.policy.distribution
    saver.save(str(tmp))
    info = describe(env_config, env_specs, version, source)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    check_out(out)  # again: someone may have written there while we saved
    os.rename(tmp, out)  # replaces an empty directory, fails on a non-empty one
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run(common: CommonConfig, config: ExportConfig, *, security: Security) -> int:
  logging.basicConfig(level=getattr(logging, common.log_level))
  # PolicySaver's notes on renaming signature arguments are not actionable here.
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  out = pathlib.Path(config.out).absolute()
  check_out(out)  # before fetching or loading anything
  with tempfile.TemporaryDirectory(prefix="dqnfleet-export-") as scratch:
    path, env_config, env_specs, network, version = load(config.policy, scratch, security)
  source = str(path.absolute()) if pathlib.Path(config.policy).exists() else config.policy
  save(env_config, env_specs, network, version, source, out)
  print(
    f"wrote {out}: greedy policy v{version} of {env_config.env_id} as a SavedModel "
    f"(load with tf.saved_model.load; {INFO_FILE} describes its input)"
  )
  return 0
