"""`dqnfleet evaluate`: episode returns of a published policy, by a published protocol.

The policy comes from a directory (a run directory, its policies/ folder, or
one version's folder; the newest version is used) or from a trainer's gRPC
address (its latest version is fetched). The protocol is in
evaluator/protocol.py, shared with the evaluator service.
"""

import json
import logging
import tempfile

from dqnfleet.core.policy.client import load
from dqnfleet.core.settings.config import CommonConfig, EvaluateConfig, ProtocolConfig
from dqnfleet.core.settings.flags import ConfigError
from dqnfleet.core.transport.security import PLAINTEXT, Security
from dqnfleet.evaluator import protocol


def evaluate(
  policy: str,
  scratch: str,
  protocol_config: ProtocolConfig,
  record: bool,
  security: Security = PLAINTEXT,
) -> tuple[dict, protocol.Result]:
  path, env_config, env_specs, network, version = load(policy, scratch, security)
  result = protocol.run(env_config, env_specs, network, protocol_config, record=record)
  summary = {
    "env_id": env_config.env_id,
    "policy_version": version,
    "policy_path": str(path),
    "protocol": protocol.describe(protocol_config, env_config),
    **result.summary(),
  }
  return summary, result


def run(
  common: CommonConfig,
  protocol_config: ProtocolConfig,
  config: EvaluateConfig,
  *,
  security: Security,
) -> int:
  logging.basicConfig(level=getattr(logging, common.log_level))
  with tempfile.TemporaryDirectory(prefix="dqnfleet-eval-") as scratch:
    summary, result = evaluate(
      config.policy, scratch, protocol_config, record=bool(config.video), security=security
    )
  if config.video:
    if result.best_frames is None:
      raise ConfigError(f"--video needs an Atari policy; {summary['env_id']} has no frames")
    summary["video"] = str(protocol.write_gif(result.best_frames, config.video))
  if config.json:
    print(json.dumps(summary))
  else:
    print(
      f"{summary['env_id']} policy v{summary['policy_version']}: mean return "
      f"{summary['mean_return']:.1f} (median {summary['median_return']:.1f}, min "
      f"{summary['min_return']:.1f}, max {summary['max_return']:.1f}) over "
      f"{summary['episodes']} episodes, mean length {summary['mean_length']:.0f} steps"
    )
    print(f"protocol: {summary['protocol']}")
    if config.video:
      print(f"video of the best episode ({max(summary['returns']):.0f} points): {summary['video']}")
  return 0
