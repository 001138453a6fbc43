"""The `dqnfleet` command: one subcommand per service, plus tools.

    dqnfleet replay | collector | trainer     run one service
    dqnfleet evaluator                        evaluate new policy versions during training
    dqnfleet up                               the whole fleet on this machine
    dqnfleet evaluate --policy DIR_OR_ADDR    returns of a published policy (Nature protocol)
    dqnfleet export --policy DIR_OR_ADDR --out DIR   the greedy policy as a SavedModel
    dqnfleet status [--json] ADDRESS...       what running services report
    dqnfleet health [--ready] ADDRESS         exit 0 iff the service is alive (ready)

Each subcommand is a record of cli/commands.py; the parser, the config-file
check, the configs and the dispatch below are derived from those records.
Heavy imports (TensorFlow, Reverb) happen inside the entry functions, so
`status` and `health` answer in a fraction of a second.
"""

import argparse
import logging
import os
import sys

from dqnfleet.cli.commands import COMMANDS, Command, Configs, Invocation
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import CommonConfig, EnvConfig, is_atari
from dqnfleet.core.settings.flags import ConfigError

log = logging.getLogger("dqnfleet")

ENV_NOTE = (
  "Every setting also reads the environment variable DQNFLEET_<NAME> (shown with each "
  "flag) and the key <name> of the --config file; a flag wins over the variable, the "
  "variable over the file. Defaults marked 'classic control' apply to non-Atari ids "
  "such as CartPole-v1."
)
CONFIG_ENV = "DQNFLEET_CONFIG"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dqnfleet", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for command in COMMANDS.values():
    sub = subparsers.add_parser(
      command.name,
      help=command.help,
      description=command.description or command.help,
      epilog=ENV_NOTE if command.tables else None,
    )
    if command.arguments:
      command.arguments(sub)
    for group in command.groups:
      flags.add_flags(sub, group, exclude=command.no_flag.get(group, frozenset()))
    if command.tables:
      sub.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(CONFIG_ENV) or None,
        help="TOML file of settings: top-level keys for every command, "
        "[<command>] tables for one (presets in deploy/presets/; env "
        "DQNFLEET_CONFIG). Flags and DQNFLEET_* variables win over it.",
      )
  return parser


def config_file(command: Command, path: str | None):
  """For each config group, the settings `path` gives it under `command`."""
  if not path:
    return lambda group: {}
  doc = flags.read_config_file(path)
  every_group = {g for c in COMMANDS.values() for g in c.groups}
  every_table = {t for c in COMMANDS.values() for tables in c.tables.values() for t in tables}
  flags.check_config_file(doc, path, flags.all_setting_names(every_group), every_table)
  # build reads only its own fields
  return lambda group: flags.config_file_values(doc, path, command.tables[group])


def build_configs(command: Command, args: argparse.Namespace) -> Configs:
  """The command's configs from flags, environment, config file and family defaults, validated."""
  from_file = config_file(command, getattr(args, "config", None))
  env = (
    flags.build(EnvConfig, args, file_values=from_file(EnvConfig))
    if EnvConfig in command.groups
    else None
  )
  classic = env is not None and not is_atari(env.env_id)
  if classic:  # the id decides which defaults the rest of EnvConfig takes
    env = flags.build(EnvConfig, args, classic_control=True, file_values=from_file(EnvConfig))
  configs = []
  for group in command.groups:
    config = (
      env
      if group is EnvConfig
      else flags.build(group, args, classic_control=classic, file_values=from_file(group))
    )
    if hasattr(config, "validate"):
      config.validate()
    configs.append(config)
  return Configs(configs)


def main(argv=None) -> int:
  from dqnfleet.core.transport import runtime

  runtime.prepare_tensorflow()
  args = build_parser().parse_args(argv)
  command = COMMANDS[args.command]
  try:
    return run_command(command, build_configs(command, args), args)
  except ConfigError as e:
    from dqnfleet.core.transport import dir_lock

    dir_lock.release_all()  # a refusal is a clean exit: no lock for the next one to take over
    print(f"dqnfleet {command.name}: error: {e}", file=sys.stderr)
    return 2


def directory(setting, configs: Configs) -> str:
  """The value of a command's directory setting (record_dir, owns_dir); "" if it has none."""
  if setting is None:
    return ""
  group, name = setting
  return getattr(configs[group], name)


def record_directory(command: Command, configs: Configs) -> str:
  return directory(command.record_dir, configs)


def lock_directory(command: Command, configs: Configs) -> None:
  """Makes this process the only `command` writing its directory (ConfigError if not)."""
  from dqnfleet.core.transport import dir_lock

  owned = directory(command.owns_dir, configs)
  if owned:
    dir_lock.hold(owned, command.name)


def run_command(command: Command, configs: Configs, args: argparse.Namespace) -> int:
  from dqnfleet.core.transport import dir_lock, run_record, security

  identity = security.from_config(configs[CommonConfig])  # for every server and channel
  if EnvConfig in configs:
    from dqnfleet.core.rl import envs

    envs.validate_env(configs[EnvConfig])
  if command.service is not None:
    return run_service(command, configs, args, identity)
  lock_directory(command, configs)
  try:
    if command.record_dir is not None:
      path = run_record.publish(
        run_record.create(command.name, command.name, configs.values()),
        record_directory(command, configs),
      )
      print(f"settings, package versions and git revision of this run: {path}", flush=True)
    return command.entry(Invocation(configs, args, identity))
  finally:
    dir_lock.release_all()


def run_service(command: Command, configs: Configs, args: argparse.Namespace, identity) -> int:
  """Runs a service until it is stopped, then ends the process with its exit code."""
  from dqnfleet.core.transport import dir_lock, metrics, run_record, runtime
  from dqnfleet.core.transport.rpc import PortUnavailable

  common, own = configs[CommonConfig], configs[command.service]
  service_id = (command.instance_id and getattr(own, command.instance_id)) or runtime.default_id(
    command.name
  )
  runtime.setup_logging(command.name, service_id, common.log_level, common.log_format)
  lock_directory(command, configs)
  record = run_record.create(command.name, service_id, configs.values())
  run_record.publish(record, record_directory(command, configs))
  try:
    metrics.serve(
      own.metrics_port,
      command.name,
      record["packages"]["dqnfleet"],
      record["git_revision"],
      identity.listen_host,
    )
    command.entry(Invocation(configs, args, identity, runtime.stop_on_signals(), service_id))
  except PortUnavailable as e:
    log.error("%s", e)
    print(f"dqnfleet {command.name}: error: {e}", file=sys.stderr)
    exit_code = 2
  else:
    exit_code = 0
  # Everything is saved and every server stopped. Exit now: Reverb's sampling
  # threads inside tf.data can otherwise keep the interpreter alive after a
  # clean shutdown, and a stopped service must not linger.
  dir_lock.release_all()
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(exit_code)


if __name__ == "__main__":
  sys.exit(main())
