"""The command table (cli/commands.py) and what is derived from it: the parser,
the configs, and the processes `dqnfleet up` would start with their flags.
In process and without starting a service, except one `--help`."""

import dataclasses
import os

import pytest

from dqnfleet.cli import up
from dqnfleet.cli.commands import COMMANDS, Configs
from dqnfleet.cli.main import build_configs, build_parser
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import (
  CollectorConfig,
  CommonConfig,
  EnvConfig,
  ProtocolConfig,
  UpConfig,
)
from support import dqnfleet


@pytest.fixture(autouse=True)
def no_settings_from_this_environment(monkeypatch):
  for name in list(os.environ):
    if name.startswith(flags.ENV_PREFIX):
      monkeypatch.delenv(name)


def configs_of(command: str, *argv: str) -> Configs:
  return build_configs(COMMANDS[command], build_parser().parse_args([command, *argv]))


def up_plan(*argv: str) -> dict[str, up.Launch]:
  return up.plan(configs_of("up", *argv))


def launched(launch: up.Launch) -> Configs:
  """The configs the launched process builds from the flags `up` gives it."""
  return configs_of(launch.command.name, *launch.argv())


def test_up_takes_the_evaluation_protocol_and_its_evaluator_gets_it(tmp_path):
  evaluator = up_plan(
    "--episodes", "5", "--epsilon", "0.001", "--eval-sticky-actions", "--run-dir", str(tmp_path)
  )["evaluator"]
  assert {"--episodes=5", "--epsilon=0.001", "--eval-sticky-actions"} <= set(evaluator.argv())
  protocol = launched(evaluator)[ProtocolConfig]
  assert (protocol.episodes, protocol.epsilon, protocol.eval_sticky_actions) == (5, 0.001, True)


def test_a_config_files_evaluator_table_reaches_ups_evaluator(tmp_path):
  path = tmp_path / "run.toml"
  path.write_text("[evaluator]\nepisodes = 5\nevery_minutes = 2.0\n")
  evaluator = up_plan("--config", str(path), "--run-dir", str(tmp_path))["evaluator"]
  assert launched(evaluator)[ProtocolConfig].episodes == 5
  assert "--every-minutes=2.0" in evaluator.argv()
  path.write_text("[evaluator]\nepisodes = 5\n[up]\nepisodes = 7\n")  # [up] wins
  assert launched(up_plan("--config", str(path))["evaluator"])[ProtocolConfig].episodes == 7
  assert (
    launched(up_plan("--config", str(path), "--episodes", "3")["evaluator"])[
      ProtocolConfig
    ].episodes
    == 3
  )  # and a flag over both


def test_dqnfleet_up_accepts_the_protocol_flags_and_lists_them():
  result = dqnfleet("up", "--episodes", "5", "--help", timeout=60)
  assert result.returncode == 0, result.stderr
  text = " ".join(result.stdout.split())  # argparse wraps help lines
  for name in (
    "--episodes EPISODES",
    "env DQNFLEET_EPISODES",
    "--eval-seed EVAL_SEED",
    "default 12345; env DQNFLEET_EVAL_SEED",
    "--eval-num-envs",
    "env DQNFLEET_EVAL_STICKY_ACTIONS",
    "default 0; env DQNFLEET_SEED",
  ):
    assert name in text, name


@pytest.mark.parametrize("env_id", ["ALE/Breakout-v5", "CartPole-v1"])
def test_each_process_up_starts_rebuilds_exactly_its_configs(tmp_path, env_id):
  launches = up_plan(
    "--env-id",
    env_id,
    "--evaluator",
    "--collectors",
    "2",
    "--seed",
    "3",
    "--run-dir",
    str(tmp_path),
  )
  assert list(launches) == ["replay", "trainer", "collector-0", "collector-1", "evaluator"]
  for launch in launches.values():
    assert dict(launched(launch)) == dict(launch.configs), launch.name
    assert launch.configs[CommonConfig].listen_host == "127.0.0.1"
  ports = [p for one in launches.values() for p in (one.status_port, one.metrics_port)]
  assert len(set(ports)) == len(ports)
  assert [launches[f"collector-{i}"].configs[CollectorConfig].seed for i in (0, 1)] == [3000, 3001]
  assert launches["evaluator"].configs[ProtocolConfig].eval_seed == 12345


def test_one_variable_sets_one_setting(monkeypatch, tmp_path):
  """Training's seed, sticky actions and environments per collector are not the protocol's."""
  monkeypatch.setenv("DQNFLEET_SEED", "4")
  monkeypatch.setenv("DQNFLEET_STICKY_ACTIONS", "true")
  monkeypatch.setenv("DQNFLEET_NUM_ENVS", "3")
  monkeypatch.setenv("DQNFLEET_EVAL_NUM_ENVS", "6")
  launches = up_plan("--collectors", "1", "--run-dir", str(tmp_path))
  collector, evaluator = launched(launches["collector-0"]), launched(launches["evaluator"])
  assert collector[CollectorConfig].seed == 4000 and collector[CollectorConfig].num_envs == 3
  assert collector[EnvConfig].sticky_actions
  assert launched(launches["replay"])[EnvConfig].sticky_actions
  protocol = evaluator[ProtocolConfig]
  assert (protocol.eval_seed, protocol.eval_sticky_actions, protocol.eval_num_envs) == (
    12345,
    False,
    6,
  )
  assert configs_of("evaluate", "--policy", "x")[ProtocolConfig].eval_num_envs == 6


def test_up_takes_no_flag_for_what_it_sets_itself():
  for argv in (
    ["--status-port", "9"],
    ["--collector-id", "x"],
    ["--out-dir", "x"],
    ["--listen-host", "::"],
  ):
    with pytest.raises(SystemExit):
      build_parser().parse_args(["up", *argv])
  assert configs_of("up", "--seed", "2", "--run-dir", "r")[UpConfig].seed == 2


def test_every_setting_of_a_command_has_one_name():
  """A name two groups of one command share would take one flag, variable and
  key for both; only settings `up` sets itself (and so takes no flag for) may."""
  for command in COMMANDS.values():
    seen: dict[str, type] = {}
    for group in command.groups:
      for field in dataclasses.fields(group):
        if field.name in command.no_flag.get(group, ()):
          continue
        assert field.name not in seen, (command.name, field.name, seen[field.name], group)
        seen[field.name] = group
    for group, tables in command.tables.items():
      assert group in command.groups and tables[-1] == command.name, (command.name, group)


def test_what_up_sets_are_settings_of_the_services_it_starts():
  started = [c for c in COMMANDS.values() if c.up_sets is not None]
  assert [c.name for c in started] == ["replay", "collector", "trainer", "evaluator"]
  for command in started:
    names = flags.all_setting_names(command.groups)
    assert command.up_sets <= names, (command.name, command.up_sets - names)
    assert command.service in command.groups and hasattr(command.service, "metrics_port")
    assert set(COMMANDS["up"].groups) >= set(command.groups)
