"""The `dqnfleet` command: one subcommand per service, plus tools.

    dqnfleet replay | collector | trainer     run one service
    dqnfleet evaluator                        evaluate new policy versions during training
    dqnfleet up                               the whole fleet on this machine
    dqnfleet evaluate --policy DIR_OR_ADDR    returns of a published policy (Nature protocol)
    dqnfleet export --policy DIR_OR_ADDR --out DIR   the greedy policy as a SavedModel
    dqnfleet status [--json] ADDRESS...       what running services report
    dqnfleet health [--ready] ADDRESS         exit 0 iff the service is alive (ready)

Heavy imports (TensorFlow, Reverb) happen inside the handlers, so `status`
and `health` answer in a fraction of a second.
"""
import argparse
import logging
import os
import sys

from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import (AgentConfig, CollectorConfig, CommonConfig, EnvConfig,
                                  EvaluateConfig, EvaluatorConfig, ExportConfig,
                                  NetworkConfig, ProtocolConfig,
                                  ReplayConfig, TrainerConfig, UpConfig, is_atari)
from dqnfleet.core.settings.flags import ConfigError

log = logging.getLogger("dqnfleet")

# What `up` sets itself for each service, so it takes no flag for them.
UP_OWNS = frozenset({"port", "status_port", "metrics_port", "replay_address", "trainer_address",
                     "collector_id", "seed", "run_dir", "checkpoint_dir", "out_dir"})

SERVICE_GROUPS = {
    "replay": (CommonConfig, EnvConfig, ReplayConfig),
    "collector": (CommonConfig, EnvConfig, NetworkConfig, CollectorConfig),
    "trainer": (CommonConfig, EnvConfig, NetworkConfig, AgentConfig, TrainerConfig),
    "evaluator": (CommonConfig, ProtocolConfig, EvaluatorConfig),
    "up": (CommonConfig, UpConfig, EnvConfig, NetworkConfig, AgentConfig, ReplayConfig,
           CollectorConfig, TrainerConfig, EvaluatorConfig),
    "evaluate": (CommonConfig, ProtocolConfig, EvaluateConfig),
    "export": (CommonConfig, ExportConfig),
}
DESCRIPTIONS = {
    "replay": "Run the replay service: a Reverb server with the replay table.",
    "collector": "Run a collector: step environments with the epsilon-greedy policy, write "
                 "transitions to replay, follow published policies.",
    "trainer": "Run the trainer: sample from replay, train DQN, checkpoint, publish policies.",
    "up": "Start replay, trainer and collectors as local processes and show live progress. "
          "Ctrl-C stops them all.",
    "evaluator": "Run the evaluator: follow the trainer's new policy versions and evaluate one "
                 "every few minutes (history, TensorBoard, GIF of the best episode).",
    "evaluate": "Evaluate a published policy (Nature DQN protocol by default) and print its "
                "episode returns and the protocol; --video writes a GIF.",
    "export": "Write a published policy's greedy policy as a TensorFlow SavedModel (TF-Agents' "
              "PolicySaver) that plain TensorFlow can load and run.",
}
ENV_NOTE = ("Every setting also reads the environment variable DQNFLEET_<NAME> (shown with each "
            "flag) and the key <name> of the --config file; a flag wins over the variable, the "
            "variable over the file. Defaults marked 'classic control' apply to non-Atari ids "
            "such as CartPole-v1.")
CONFIG_ENV = "DQNFLEET_CONFIG"
# The table of a config file that `up` applies to each group, besides [up].
ROLE_OF_GROUP = {ReplayConfig: "replay", TrainerConfig: "trainer", AgentConfig: "trainer",
                 CollectorConfig: "collector", EvaluatorConfig: "evaluator"}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dqnfleet", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, groups in SERVICE_GROUPS.items():
    sub = commands.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name],
                              epilog=ENV_NOTE)
    if name == "up":  # up's own settings, then the services' that it does not set itself
      flags.add_flags(sub, groups[0], exclude={"listen_host"})  # loopback, always
      flags.add_flags(sub, groups[1])
      flags.add_flags(sub, *groups[2:], exclude=UP_OWNS)
    else:
      flags.add_flags(sub, *groups)
    sub.add_argument("--config", metavar="FILE", default=os.environ.get(CONFIG_ENV) or None,
                     help="TOML file of settings: top-level keys for every command, [<command>] "
                          "tables for one (presets in deploy/presets/; env DQNFLEET_CONFIG). "
                          "Flags and DQNFLEET_* variables win over it.")
  status = commands.add_parser("status", help="Print what services report over their status RPC.",
                               description="Print role, id, counters, policy version and replay "
                                           "size of each service.")
  status.add_argument("addresses", nargs="+", metavar="ADDRESS",
                      help="host:port of a service's status endpoint (replay: its status port)")
  status.add_argument("--json", action="store_true", help="print one JSON array")
  status.add_argument("--timeout", type=float, default=5.0, help="seconds per service")
  flags.add_flags(status, CommonConfig)  # TLS and token of the servers it asks
  health = commands.add_parser("health", help="Exit 0 if the service answers SERVING.",
                               description="gRPC health check, for container health probes.")
  health.add_argument("address", metavar="ADDRESS", help="host:port of the health endpoint")
  health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
  health.add_argument("--ready", action="store_true",
                      help="ask readiness (can it do its job now: peers reached, a policy "
                           "published or loaded; not while stopping) instead of liveness")
  flags.add_flags(health, CommonConfig)
  return parser


def config_file(command: str, path: str | None):
  """For each config class, the settings `path` gives it under `command`."""
  if not path:
    return lambda group: {}
  doc = flags.read_config_file(path)
  every_group = {g for groups in SERVICE_GROUPS.values() for g in groups}
  flags.check_config_file(doc, path, flags.all_setting_names(every_group),
                             set(SERVICE_GROUPS))

  def values(group) -> dict:
    tables = [command]
    if command == "up" and group in ROLE_OF_GROUP:
      tables.insert(0, ROLE_OF_GROUP[group])  # [up] still wins
    return flags.config_file_values(doc, path, tables)  # build reads only its own fields
  return values


def build_configs(groups, args, command: str = "") -> list:
  """Each group's config from flags, environment, config file and the env family's defaults."""
  from_file = config_file(command, getattr(args, "config", None))
  env = (flags.build(EnvConfig, args, file_values=from_file(EnvConfig))
         if EnvConfig in groups else None)
  classic = env is not None and not is_atari(env.env_id)
  if classic:  # the id decides which defaults the rest of EnvConfig takes
    env = flags.build(EnvConfig, args, classic_control=True, file_values=from_file(EnvConfig))
  configs = []
  for group in groups:
    config = env if group is EnvConfig else flags.build(
        group, args, classic_control=classic, file_values=from_file(group))
    if hasattr(config, "validate"):
      config.validate()
    configs.append(config)
  return configs


def main(argv=None) -> int:
  from dqnfleet.core.transport import runtime
  runtime.quiet_imports()
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.command in ("status", "health"):
      from dqnfleet.core.transport import security
      identity = security.from_config(flags.build(CommonConfig, args))
    if args.command == "status":
      from dqnfleet.cli.status import run as run_status
      return run_status(args.addresses, as_json=args.json, timeout=args.timeout,
                        security=identity)
    if args.command == "health":
      from dqnfleet.core.transport import rpc
      service = rpc.READINESS if args.ready else ""
      return 0 if rpc.check_health(args.address, args.timeout, service, identity) else 1
    configs = build_configs(SERVICE_GROUPS[args.command], args, args.command)
    return run_command(args.command, configs)
  except ConfigError as e:
    print(f"dqnfleet {args.command}: error: {e}", file=sys.stderr)
    return 2


# The config of each service that holds its ports and directories.
SERVICE_CONFIG = {"replay": ReplayConfig, "collector": CollectorConfig, "trainer": TrainerConfig,
                  "evaluator": EvaluatorConfig}


# Where a service keeps its run.json: its own run directory. Replay's record
# stays in its log: its checkpoint directory belongs to Reverb. Collectors
# have no directory.
RECORD_DIRECTORY = {"trainer": "run_dir", "evaluator": "out_dir"}


def run_command(command: str, configs: list) -> int:
  from dqnfleet.core.rl import envs
  from dqnfleet.core.transport import run_record, runtime, security
  common = configs[0]
  identity = security.from_config(common)  # every server and channel of this process uses it
  env = next((c for c in configs if isinstance(c, EnvConfig)), None)
  if env is not None:
    envs.validate_env(env)
  by_type = {type(c): c for c in configs}
  if command == "up":
    from dqnfleet.cli.up import run as run_up
    path = run_record.publish(run_record.create("up", "up", configs), by_type[UpConfig].run_dir)
    print(f"settings, package versions and git revision of this run: {path}", flush=True)
    return run_up(*configs, security=identity)
  if command == "evaluate":
    from dqnfleet.cli.evaluate import run as run_evaluate
    return run_evaluate(*configs, security=identity)
  if command == "export":
    from dqnfleet.cli.export import run as run_export
    return run_export(*configs, security=identity)

  service_id = runtime.default_id(command)
  if command == "collector" and by_type[CollectorConfig].collector_id:
    service_id = by_type[CollectorConfig].collector_id
  runtime.setup_logging(command, service_id, common.log_level, common.log_format)
  record = run_record.create(command, service_id, configs)
  service_config = by_type[SERVICE_CONFIG[command]]
  run_record.publish(record, getattr(service_config, RECORD_DIRECTORY.get(command, ""), ""))
  from dqnfleet.core.transport import metrics
  from dqnfleet.core.transport.rpc import PortUnavailable
  try:
    metrics.serve(service_config.metrics_port, command, record["packages"]["dqnfleet"],
                  record["git_revision"], identity.listen_host)
    stop = runtime.stop_on_signals()
    if command == "replay":
      from dqnfleet.replay.server import serve
      serve(env, by_type[ReplayConfig], stop, identity)
    elif command == "collector":
      from dqnfleet.collector.collector import serve
      serve(env, by_type[NetworkConfig], by_type[CollectorConfig], stop, service_id, identity)
    elif command == "trainer":
      from dqnfleet.trainer.trainer import serve
      serve(env, by_type[NetworkConfig], by_type[AgentConfig], by_type[TrainerConfig], stop,
            identity)
    elif command == "evaluator":
      from dqnfleet.evaluator.evaluator import serve
      serve(by_type[ProtocolConfig], by_type[EvaluatorConfig], stop, identity, service_id)
  except PortUnavailable as e:
    log.error("%s", e)
    print(f"dqnfleet {command}: error: {e}", file=sys.stderr)
    exit_code = 2
  else:
    exit_code = 0
  # Everything is saved and every server stopped. Exit now: Reverb's sampling
  # threads inside tf.data can otherwise keep the interpreter alive after a
  # clean shutdown, and a stopped service must not linger.
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(exit_code)


if __name__ == "__main__":
  sys.exit(main())
