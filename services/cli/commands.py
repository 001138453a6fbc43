"""The `dqnfleet` subcommands: one `Command` record each, in `COMMANDS`.

Everything that differs between commands is a field of its record. main.py
derives from the table the argparse parser, the config-file check, the
configs each command builds and how it is run; up.py derives which groups,
config-file tables and flags each service it starts gets. A new command, or
a new config group of one, is an edit of this table alone (and for a service
that `up` starts, of the values up.py's `plan` gives what it sets itself).

Configs travel by type (`Configs`), never by position: an entry function
picks the groups it needs, whatever their order in `groups`.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from dqnfleet.core.settings.config import (
  AgentConfig,
  CollectorConfig,
  CommonConfig,
  EnvConfig,
  EvaluateConfig,
  EvaluatorConfig,
  ExportConfig,
  InputWorkerConfig,
  NetworkConfig,
  ProtocolConfig,
  ReplayConfig,
  TrainerConfig,
  UpConfig,
)

if TYPE_CHECKING:  # grpc is imported by the commands that connect, not by --help
  from dqnfleet.core.transport.security import Security

T = TypeVar("T")


class Configs(Mapping[type, Any]):
  """One command's configs by type: `configs[TrainerConfig]` is its TrainerConfig."""

  def __init__(self, configs: Iterable[Any] = ()):
    self._by_type = {type(c): c for c in configs}

  def __getitem__(self, cls: type[T]) -> T:
    return self._by_type[cls]

  def __iter__(self) -> Iterator[type]:
    return iter(self._by_type)

  def __len__(self) -> int:
    return len(self._by_type)

  def __repr__(self) -> str:
    return f"Configs({list(self._by_type.values())!r})"


@dataclasses.dataclass(frozen=True)
class Invocation:
  """What a command's entry function is given."""

  configs: Configs
  args: argparse.Namespace  # for a tool's own arguments (`status` ADDRESS...)
  security: Security
  stop: threading.Event | None = None  # services: set on SIGTERM or SIGINT
  service_id: str = ""  # services: this instance's id


# A setting of one config group, e.g. (TrainerConfig, "run_dir").
Setting = tuple[type, str]


@dataclasses.dataclass(frozen=True)
class Command:
  """One `dqnfleet` subcommand."""

  name: str
  help: str  # its line in `dqnfleet --help`, and its description unless `description` is set
  # Runs the command. A service's returns when `stop` is set; a tool's returns
  # its exit code. Each imports what it needs, so `status` starts fast.
  entry: Callable[[Invocation], int | None]
  groups: tuple[type, ...] = ()  # the config groups it builds, in the order --help lists them
  # For each group, the tables of a --config file it reads after the
  # top-level keys, the last one winning. Empty: the command takes no --config.
  tables: Mapping[type, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  description: str = ""
  arguments: Callable[[argparse.ArgumentParser], None] | None = None  # besides its settings
  # For a service, the group with its ports: main serves metrics on its
  # metrics_port and runs `entry` until stopped. None: a tool.
  service: type | None = None
  status_port: str = "status_port"  # the setting of `service` its status RPC and health are on
  instance_id: str = ""  # the setting of `service` naming this instance, if any
  # The directory for run.json, if it keeps one. Services log their record
  # in any case; a tool with a directory writes one there before it runs.
  record_dir: Setting | None = None
  # The directory it writes that no other process of its kind may write at
  # the same time: locked while it runs, a second one exits 2
  # (core/transport/dir_lock.py). An empty setting: nothing to lock.
  owns_dir: Setting | None = None
  # The settings `up` gives this service itself (None: `up` does not start it).
  up_sets: frozenset[str] | None = None
  # Per group, settings that get no flag because `up` sets them (up only).
  no_flag: Mapping[type, frozenset[str]] = dataclasses.field(default_factory=dict)


def _command(name: str, groups: tuple[type, ...], **fields) -> Command:
  """A command whose every group reads its own config-file table ([trainer] for `trainer`)."""
  return Command(name=name, groups=groups, tables={g: (name,) for g in groups}, **fields)


def _up(services: Iterable[Command]) -> Command:
  """`up`: its own settings and those of the services it starts that it does not set itself.

  A group that one of those services alone reads ([trainer] for AgentConfig)
  also reads that service's config-file table, under [up], which wins. A group
  several of them read (EnvConfig) reads top-level keys and [up] only: the
  services must agree on it, and a [replay] value could contradict a [trainer] one.
  """
  started = [s for s in services if s.up_sets is not None]
  groups = [CommonConfig, UpConfig]
  for service in started:
    groups += [g for g in service.groups if g not in groups]
  readers = {g: [s for s in started if g in s.groups] for g in groups}
  tables = {g: (readers[g][0].name, "up") if len(readers[g]) == 1 else ("up",) for g in groups}
  return Command(
    name="up",
    help="Start replay, trainer and collectors as local processes and show live progress. "
    "Ctrl-C stops them all.",
    entry=_run_up,
    groups=tuple(groups),
    tables=tables,
    record_dir=(UpConfig, "run_dir"),
    owns_dir=(UpConfig, "run_dir"),
    no_flag={
      g: frozenset().union(*(r.up_sets for r in readers[g]))
      & {f.name for f in dataclasses.fields(g)}
      for g in groups
    },
  )


def _run_replay(run: Invocation) -> None:
  from dqnfleet.replay.server import serve

  serve(run.configs[EnvConfig], run.configs[ReplayConfig], run.stop, run.security)


def _run_collector(run: Invocation) -> None:
  from dqnfleet.collector.collector import serve

  serve(
    run.configs[EnvConfig],
    run.configs[NetworkConfig],
    run.configs[CollectorConfig],
    run.stop,
    run.service_id,
    run.security,
  )


def _run_trainer(run: Invocation) -> None:
  from dqnfleet.trainer.trainer import serve

  serve(
    run.configs[EnvConfig],
    run.configs[NetworkConfig],
    run.configs[AgentConfig],
    run.configs[TrainerConfig],
    run.stop,
    run.security,
  )


def _run_input_worker(run: Invocation) -> None:
  from dqnfleet.trainer.input_service import serve

  serve(run.configs[InputWorkerConfig], run.stop, run.security, run.service_id)


def _run_evaluator(run: Invocation) -> None:
  from dqnfleet.evaluator.evaluator import serve

  serve(
    run.configs[ProtocolConfig],
    run.configs[EvaluatorConfig],
    run.stop,
    run.security,
    run.service_id,
  )


def _run_up(run: Invocation) -> int:
  from dqnfleet.cli import up

  return up.run(run.configs, security=run.security)


def _run_evaluate(run: Invocation) -> int:
  from dqnfleet.cli.evaluate import run as evaluate

  return evaluate(
    run.configs[CommonConfig],
    run.configs[ProtocolConfig],
    run.configs[EvaluateConfig],
    security=run.security,
  )


def _run_export(run: Invocation) -> int:
  from dqnfleet.cli.export import run as export

  return export(run.configs[CommonConfig], run.configs[ExportConfig], security=run.security)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "addresses",
    nargs="+",
    metavar="ADDRESS",
    help="host:port of a service's status endpoint (replay: its status port)",
  )
  parser.add_argument("--json", action="store_true", help="print one JSON array")
  parser.add_argument("--timeout", type=float, default=5.0, help="seconds per service")


def _run_status(run: Invocation) -> int:
  from dqnfleet.cli.status import run as status

  return status(
    run.args.addresses, as_json=run.args.json, timeout=run.args.timeout, security=run.security
  )


def _health_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("address", metavar="ADDRESS", help="host:port of the health endpoint")
  parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
  parser.add_argument(
    "--ready",
    action="store_true",
    help="ask readiness (can it do its job now: peers reached, a policy "
    "published or loaded; not while stopping) instead of liveness",
  )
  parser.add_argument(
    "--name",
    default="",
    help="ask this health name instead: persistence (writes reach the disk), replay-shards "
    "(trainer: every replay shard answers), trainer (collector, evaluator: the trainer's "
    "policy API answers)",
  )


def _run_health(run: Invocation) -> int:
  from dqnfleet.core.transport import rpc

  service = run.args.name or (rpc.READINESS if run.args.ready else "")
  return 0 if rpc.check_health(run.args.address, run.args.timeout, service, run.security) else 1


# `up` gives every service 127.0.0.1 (listen_host) and the loopback ports and
# addresses it picked; the directories are inside its run directory.
_SERVICES = (
  _command(
    "replay",
    (CommonConfig, EnvConfig, ReplayConfig),
    entry=_run_replay,
    help="Run the replay service: a Reverb server with the replay table.",
    # No run.json: the checkpoint directory belongs to Reverb, so the
    # record stays in the log.
    # Not locked either (owns_dir): Reverb's checkpointer deletes what it did not write
    # in that directory, a lock file included; up's lock and the StatefulSet keep it single.
    service=ReplayConfig,
    up_sets=frozenset({"listen_host", "port", "status_port", "metrics_port", "checkpoint_dir"}),
  ),
  _command(
    "collector",
    (CommonConfig, EnvConfig, NetworkConfig, CollectorConfig),
    entry=_run_collector,
    help="Run a collector: step environments with the epsilon-greedy policy, write "
    "transitions to replay, follow published policies.",
    service=CollectorConfig,
    instance_id="collector_id",  # no directory, no run.json
    up_sets=frozenset(
      {
        "listen_host",
        "replay_addresses",
        "trainer_address",
        "collector_id",
        "seed",
        "status_port",
        "metrics_port",
      }
    ),
  ),
  _command(
    "trainer",
    (CommonConfig, EnvConfig, NetworkConfig, AgentConfig, TrainerConfig),
    entry=_run_trainer,
    help="Run the trainer: sample from replay, train DQN, checkpoint, publish policies.",
    service=TrainerConfig,
    status_port="port",
    record_dir=(TrainerConfig, "run_dir"),
    owns_dir=(TrainerConfig, "run_dir"),
    # One machine's fleet samples in the trainer: input workers are for other hosts.
    up_sets=frozenset(
      {
        "listen_host",
        "replay_addresses",
        "port",
        "metrics_port",
        "run_dir",
        "input_dispatcher_port",
      }
    ),
  ),
  _command(
    "evaluator",
    (CommonConfig, ProtocolConfig, EvaluatorConfig),
    entry=_run_evaluator,
    help="Run the evaluator: follow the trainer's new policy versions and evaluate one "
    "every few minutes (history, TensorBoard, GIF of the best episode).",
    service=EvaluatorConfig,
    record_dir=(EvaluatorConfig, "out_dir"),
    owns_dir=(EvaluatorConfig, "out_dir"),
    up_sets=frozenset({"listen_host", "trainer_address", "status_port", "metrics_port", "out_dir"}),
  ),
)

COMMANDS: dict[str, Command] = {
  c.name: c
  for c in (
    *_SERVICES,
    _up(_SERVICES),
    _command(
      "input-worker",
      (CommonConfig, InputWorkerConfig),
      entry=_run_input_worker,
      help="Run an input worker: sample replay and build batches for a trainer started with "
      "--input-dispatcher-port (tf.data service), on a host of its own.",
      service=InputWorkerConfig,
    ),
    _command(
      "evaluate",
      (CommonConfig, ProtocolConfig, EvaluateConfig),
      entry=_run_evaluate,
      help="Evaluate a published policy (Nature DQN protocol by default) and print its "
      "episode returns and the protocol; --video writes a GIF.",
    ),
    _command(
      "export",
      (CommonConfig, ExportConfig),
      entry=_run_export,
      help="Write a published policy's greedy policy as a TensorFlow SavedModel (TF-Agents' "
      "PolicySaver) that plain TensorFlow can load and run.",
    ),
    # Only the TLS and token of the servers they ask: no --config file.
    Command(
      name="status",
      entry=_run_status,
      groups=(CommonConfig,),
      arguments=_status_arguments,
      help="Print what services report over their status RPC.",
      description="Print role, id, counters, policy version and replay size of each service.",
    ),
    Command(
      name="health",
      entry=_run_health,
      groups=(CommonConfig,),
      arguments=_health_arguments,
      help="Exit 0 if the service answers SERVING.",
      description="gRPC health check, for container health probes.",
    ),
  )
}
