"""Settings: flags, environment variables, family defaults, refusal of bad input."""

import pytest

from dqnfleet.cli.main import build_configs, build_parser
from dqnfleet.core import settings
from dqnfleet.core.config import EnvConfig, ReplayConfig

from conftest import dqnfleet, wait_until


def parse(*argv):
  return build_parser().parse_args(list(argv))


def test_flag_beats_environment_beats_family_default():
  args = parse("replay", "--env-id", "CartPole-v1", "--max-size", "777")
  env = {"DQNFLEET_MAX_SIZE": "555", "DQNFLEET_MIN_SIZE": "50"}
  replay = settings.build(ReplayConfig, args, env, classic_control=True)
  assert replay.max_size == 777          # flag
  assert replay.min_size == 50           # environment variable
  assert replay.samples_per_insert == 64.0  # classic-control default
  atari = settings.build(ReplayConfig, parse("replay"), {}, classic_control=False)
  assert atari.samples_per_insert == 8.0 and atari.max_size == 1_000_000


def test_tuple_and_bool_settings_parse_from_environment():
  args = parse("collector")
  env = {"DQNFLEET_TERMINAL_ON_LIFE_LOSS": "true", "DQNFLEET_ENV_ID": "ALE/Pong-v5"}
  config = settings.build(EnvConfig, args, env)
  assert config.terminal_on_life_loss is True and config.env_id == "ALE/Pong-v5"
  assert settings.to_flags(config)[:1] == ["--env-id=ALE/Pong-v5"]


def test_every_setting_has_help_and_an_environment_variable():
  text = build_parser()._subparsers._group_actions[0].choices["trainer"].format_help()
  for name in ("--replay-address", "DQNFLEET_REPLAY_ADDRESS", "--publish-every",
               "DQNFLEET_BATCH_SIZE", "--double-dqn", "classic control"):
    assert name in text


@pytest.mark.parametrize("argv, message", [
    (["replay", "--max-size", "-5"], "--max-size must be >= 1, got -5"),
    (["replay", "--port", "70000"], "--port must be <= 65535, got 70000"),
    (["replay", "--min-size", "500", "--max-size", "100"], "--min-size (500) must be <= --max-size (100)"),
    (["collector", "--num-envs", "many"], "--num-envs='many' is not a valid integer"),
    (["trainer", "--optimizer", "sgd"], "--optimizer must be one of adam, rmsprop, got 'sgd'"),
    (["collector", "--epsilon-start", "0.1", "--epsilon-end", "0.5"], "--epsilon-end (0.5) must be <="),
])
def test_bad_settings_are_refused_in_process(argv, message):
  args = parse(*argv)
  from dqnfleet.cli.main import SERVICE_GROUPS
  with pytest.raises(settings.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    build_configs(SERVICE_GROUPS[args.command], args)


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
  cartpole = services("replay", "replay", "--env-id", "CartPole-v1", "--port", "0",
                      "--status-port", "0", "--checkpoint-dir", str(checkpoints),
                      "--checkpoint-every-s", "0")
  wait_until(lambda: "health and status on port" in cartpole.log(), 120, "replay to start")
  assert cartpole.stop() == 0
  saved = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
  assert saved  # checkpointed at shutdown

  result = dqnfleet("replay", "--env-id", "Acrobot-v1", "--port", "0", "--status-port", "0",
                    "--checkpoint-dir", str(checkpoints), timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert (f"dqnfleet replay: error: the replay checkpoint in --checkpoint-dir {checkpoints} "
          "does not match --env-id Acrobot-v1") in result.stderr
  assert "frames float32[2, 6]" in result.stderr  # what Acrobot's layout needs
  assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == saved
