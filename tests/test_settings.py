"""Settings: flags, environment variables, family defaults, refusal of bad input."""

import argparse
import dataclasses
import re
import threading

import pytest

from dqnfleet.cli.main import build_configs, build_parser
from dqnfleet.core.settings import config as config_module
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import EnvConfig, ReplayConfig
from support import dqnfleet, service_args, wait_until


def parse(*argv):
  return build_parser().parse_args(list(argv))


def test_flag_beats_environment_beats_family_default():
  args = parse("replay", "--env-id", "CartPole-v1", "--max-size", "777")
  env = {"DQNFLEET_MAX_SIZE": "555", "DQNFLEET_MIN_SIZE": "50"}
  replay = flags.build(ReplayConfig, args, env, classic_control=True)
  assert replay.max_size == 777  # flag
  assert replay.min_size == 50  # environment variable
  assert replay.samples_per_insert == 64.0  # classic-control default
  atari = flags.build(ReplayConfig, parse("replay"), {}, classic_control=False)
  assert atari.samples_per_insert == 8.0 and atari.max_size == 1_000_000


def test_tuple_and_bool_settings_parse_from_environment():
  args = parse("collector")
  env = {"DQNFLEET_TERMINAL_ON_LIFE_LOSS": "true", "DQNFLEET_ENV_ID": "ALE/Pong-v5"}
  config = flags.build(EnvConfig, args, env)
  assert config.terminal_on_life_loss is True and config.env_id == "ALE/Pong-v5"
  assert flags.to_flags(config)[:1] == ["--env-id=ALE/Pong-v5"]


# What `up` sets itself for each service it starts (loopback, ports, peers'
# addresses, ids, seeds and directories under its run dir): no flag of its own.
UP_SETS_ITSELF = {
  "listen_host",
  "port",
  "status_port",
  "metrics_port",
  "replay_addresses",
  "trainer_address",
  "collector_id",
  "seed",
  "run_dir",
  "checkpoint_dir",
  "out_dir",
  "input_dispatcher_port",  # the fleet on one machine samples in the trainer
}


def commands() -> dict[str, argparse.ArgumentParser]:
  """Every `dqnfleet` subcommand's parser, by name."""
  (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
  return subparsers.choices


def help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
  """Each option's entry in `parser`'s --help, by its first flag, with the
  whitespace of the line wrapping taken out."""
  entries = {}
  for block in re.split(r"\n(?=  -)|\n\n", parser.format_help()):
    if block.startswith("  -"):
      entries[block.split()[0].rstrip(",")] = re.sub(r"\s+", "", block)
  return entries


def test_every_setting_has_help_and_an_environment_variable():
  """For every command and each of its settings groups (a dataclass of
  dqnfleet.core.settings.config, an argument group of the command's parser),
  --help lists every setting with its flag, its DQNFLEET_ variable and its help."""
  offered = {}  # settings class -> the fields some command has a flag for
  for command, parser in commands().items():
    entries = help_entries(parser)
    groups = [
      (getattr(config_module, g.title), g)
      for g in parser._action_groups
      if dataclasses.is_dataclass(getattr(config_module, g.title or "", None))
    ]
    assert groups, f"dqnfleet {command} lists no settings"
    for cls, group in groups:
      fields = {f.name: f for f in dataclasses.fields(cls)}
      actions = {a.dest: a for a in group._group_actions}
      assert set(actions) <= set(fields), (command, cls.__name__, set(actions) - set(fields))
      left_out = set(fields) - set(actions)
      assert left_out <= (UP_SETS_ITSELF if command == "up" else set()), (command, left_out)
      offered.setdefault(cls, set()).update(actions)
      for name, action in actions.items():
        field, flag = fields[name], flags.flag_name(fields[name])
        where = f"dqnfleet {command} {flag}"
        assert action.option_strings[0] == flag and action.help != argparse.SUPPRESS, where
        assert field.metadata["help"].strip(), f"{where}: no help"
        entry = entries.get(flag, "")
        assert flags.env_name(field) in entry, f"{where}: no {flags.env_name(field)} in --help"
        assert re.sub(r"\s+", "", field.metadata["help"]) in entry, f"{where}: no help in --help"
  # Each setting of every group has a flag somewhere: what up sets, the service takes.
  for cls, names in offered.items():
    assert names == {f.name for f in dataclasses.fields(cls)}, (cls.__name__, names)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["replay", "--max-size", "-5"], "--max-size must be >= 1, got -5"),
    (["replay", "--port", "70000"], "--port must be <= 65535, got 70000"),
    (
      ["replay", "--min-size", "500", "--max-size", "100"],
      "--min-size (500) must be <= --max-size (100)",
    ),
    (["collector", "--num-envs", "many"], "--num-envs='many' is not a valid integer"),
    (["trainer", "--optimizer", "sgd"], "--optimizer must be one of adam, rmsprop, got 'sgd'"),
    (
      ["collector", "--epsilon-start", "0.1", "--epsilon-end", "0.5"],
      "--epsilon-end (0.5) must be <=",
    ),
    (
      ["trainer", "--learning-rate", "nan"],
      "--learning-rate must be a finite number, got nan (flag --learning-rate, env "
      "DQNFLEET_LEARNING_RATE)",
    ),
    (["replay", "--checkpoint-every-s", "inf"], "--checkpoint-every-s must be a finite number"),
    (
      ["collector", "--trainer-address", "127.0.0.1:70000"],
      "--trainer-address '127.0.0.1:70000' has port '70000'; a port is 1..65535",
    ),
    (["collector", "--replay-addresses", "replay"], "--replay-addresses 'replay' is not host:port"),
    (
      ["trainer", "--replay-addresses", "localhost:8000,my host:80"],
      "has a host 'my host' with characters",
    ),
    (["evaluator", "--trainer-address", "[::1:80"], "without its closing ]"),
  ],
)
def test_bad_settings_are_refused_in_process(argv, message):
  args = parse(*argv)
  from dqnfleet.cli.commands import COMMANDS

  with pytest.raises(flags.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    build_configs(COMMANDS[args.command], args)


def test_bad_settings_exit_nonzero_with_a_clear_message(tmp_path):
  result = dqnfleet("replay", "--max-size", "-5")
  assert result.returncode == 2
  assert "dqnfleet replay: error: --max-size must be >= 1, got -5" in result.stderr
  result = dqnfleet("collector", "--env-id", "NoSuchGame-v9")
  assert result.returncode == 2
  assert "--env-id 'NoSuchGame-v9' is not a registered gymnasium environment" in result.stderr
  result = dqnfleet("trainer", "--env-id", "Pendulum-v1")
  assert result.returncode == 2 and "Discrete action space" in result.stderr
  result = dqnfleet("replay", env={"DQNFLEET_SAMPLES_PER_INSERT": "lots"})
  assert result.returncode == 2
  assert "DQNFLEET_SAMPLES_PER_INSERT='lots' is not a valid number" in result.stderr


def test_a_replay_checkpoint_of_another_environment_is_refused_and_kept(services, tmp_path):
  checkpoints = tmp_path / "replay_checkpoints"
  cartpole = services(
    "replay",
    *service_args(
      "replay",
      env_id="CartPole-v1",
      port=0,
      status_port=0,
      checkpoint_dir=checkpoints,
      checkpoint_every_s=0,
    ),
  )
  wait_until(lambda: "health and status on port" in cartpole.log(), 120, "replay to start")
  assert cartpole.stop() == 0
  saved = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
  assert saved  # checkpointed at shutdown

  result = dqnfleet(
    *service_args("replay", env_id="Acrobot-v1", port=0, status_port=0, checkpoint_dir=checkpoints),
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert (
    f"dqnfleet replay: error: the replay checkpoint in --checkpoint-dir {checkpoints} "
    "does not match --env-id Acrobot-v1"
  ) in result.stderr
  assert "frames float32[2, 6]" in result.stderr  # what Acrobot's layout needs
  assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == saved


def configs_of(command, *argv):
  from dqnfleet.cli.commands import COMMANDS

  args = parse(command, *argv)
  return {type(c).__name__: c for c in build_configs(COMMANDS[command], args).values()}


def test_a_config_file_sits_between_environment_variables_and_defaults(tmp_path, monkeypatch):
  path = tmp_path / "run.toml"
  path.write_text(
    'env_id = "CartPole-v1"\nmax_size = 5000\nmin_size = 100\n'
    "samples_per_insert = 4\nfc_layers = [64, 32]\n"
    "[replay]\nmin_size = 200\n[trainer]\nbatch_size = 16\n[up]\ncollectors = 3\n"
  )
  monkeypatch.setenv("DQNFLEET_MAX_SIZE", "6000")
  replay = configs_of("replay", "--config", str(path), "--samples-per-insert", "2")
  assert replay["ReplayConfig"].samples_per_insert == 2.0  # flag beats file
  assert replay["ReplayConfig"].max_size == 6000  # variable beats file
  assert replay["ReplayConfig"].min_size == 200  # [replay] beats top level
  assert replay["EnvConfig"].env_id == "CartPole-v1"  # file beats default
  assert replay["EnvConfig"].n_step == 1  # classic-control default
  collector = configs_of("collector", "--config", str(path))
  assert collector["NetworkConfig"].fc_layers == (64, 32)
  trainer = configs_of("trainer", "--config", str(path))
  assert trainer["AgentConfig"].batch_size == 16
  # `up` applies each service's table to that service's settings, [up] to its own.
  up = configs_of("up", "--config", str(path))
  assert up["AgentConfig"].batch_size == 16 and up["ReplayConfig"].min_size == 200
  assert up["UpConfig"].collectors == 3
  monkeypatch.setenv("DQNFLEET_CONFIG", str(path))  # the file named by a variable
  assert configs_of("trainer")["AgentConfig"].batch_size == 16


@pytest.mark.parametrize(
  "text, message",
  [
    ("batch_sise = 32\n", "batch_sise is not a setting"),
    ("[trainers]\nbatch_size = 32\n", "[trainers] is not a command"),
    ("[trainer]\nbatch = 3\n", "[trainer] batch is not a setting"),
    ("batch_size = 3.5\n", "batch_size in .* = 3.5 is not a valid integer"),
    ("double_dqn = 1\n", "double_dqn in .* = 1 is not a valid boolean"),
    ('fc_layers = [64, "x"]\n', "fc_layers in .* is not a valid comma-separated list of int"),
    ("batch_size = -3\n", "--batch-size must be >= 1, got -3"),
    ("batch_size = \n", "is not a readable TOML file"),
  ],
)
def test_a_bad_config_file_is_refused_with_what_is_wrong(tmp_path, text, message):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  with pytest.raises(flags.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    configs_of("trainer", "--config", str(path))


def test_a_missing_config_file_stops_the_command_with_a_clear_message(tmp_path):
  result = dqnfleet("trainer", "--config", str(tmp_path / "nope.toml"))
  assert result.returncode == 2
  assert f"--config '{tmp_path / 'nope.toml'}': no such file" in result.stderr


@pytest.mark.parametrize("preset", ["breakout", "cartpole"])
def test_the_presets_load_for_every_command(preset):
  from dqnfleet.cli.commands import COMMANDS

  for command in COMMANDS:
    if command in ("evaluate", "export", "status", "health"):
      continue  # they need --policy, or addresses and read no config file
    configs = configs_of(command, "--config", f"deploy/presets/{preset}.toml")
    env = configs.get("EnvConfig")
    if env is not None:
      assert env.env_id == {"breakout": "ALE/Breakout-v5", "cartpole": "CartPole-v1"}[preset]


def test_a_port_in_use_is_refused_not_shared():
  """gRPC's SO_REUSEPORT default would let a second server share the port."""
  from dqnfleet.core.transport import rpc
  from dqnfleet.core.transport.security import PLAINTEXT
  from dqnfleet.core.transport.status import CollectorCounters, Report, StatusServicer

  status = lambda name: StatusServicer("collector", name, "", lambda: Report(CollectorCounters()))
  first, port = rpc.start_server(0, status("a"), security=PLAINTEXT)
  try:
    with pytest.raises(OSError, match=f"cannot listen on port {port}"):
      rpc.start_server(port, status("b"), security=PLAINTEXT)
  finally:
    first.stop(grace=0)


def test_a_service_given_a_port_in_use_exits_with_an_error_naming_it():
  import socket

  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = dqnfleet(
      *service_args("replay", env_id="CartPole-v1", port=0, status_port=port, metrics_port=-1),
      timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"dqnfleet replay: error: cannot listen on port {port}: it is in use" in result.stderr
    result = dqnfleet(
      *service_args("replay", env_id="CartPole-v1", port=0, status_port=0, metrics_port=port),
      timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"dqnfleet replay: error: cannot serve metrics on port {port}" in result.stderr


def test_reconnect_backoff_doubles_to_its_cap_with_jitter():
  from dqnfleet.core.transport import rpc

  backoff = rpc.Backoff(first=1.0, cap=4.0)
  waits = [backoff.jittered() for _ in range(200)]
  assert all(0.5 <= w < 1.5 for w in waits) and len(set(waits)) > 150
  stop = threading.Event()
  stop.set()  # wait returns at once when stopped, and the delay still grows
  delays = []
  for _ in range(4):
    assert backoff.wait(stop) is True
    delays.append(backoff.delay)
  assert delays == [2.0, 4.0, 4.0, 4.0]
  backoff.reset()
  assert backoff.delay == 1.0
