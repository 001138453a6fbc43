"""`dqnfleet evaluate` on Atari: the published protocol, episodes that end, and a GIF."""

import json

import pytest
from PIL import Image

from dqnfleet.core.policy import store
from dqnfleet.core.rl import envs, networks, specs
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig, ProtocolConfig
from dqnfleet.evaluator import protocol
from support import dqnfleet, free_port, service_args, start_trainer_without_data, wait_until


@pytest.fixture(scope="module")
def untrained_breakout(tmp_path_factory):
  """What a fresh Breakout trainer publishes first: v0, random weights."""
  env, net = EnvConfig(env_id="ALE/Breakout-v5"), NetworkConfig()
  policies = tmp_path_factory.mktemp("run") / "policies"
  store.publish(policies, 0, networks.q_net(specs.env_specs(env), net), env, net, keep=1)
  return policies


def test_an_untrained_breakout_policy_finishes_ten_whole_games(untrained_breakout, tmp_path):
  """Greedy play never presses FIRE; epsilon 0.05 does, so every game ends by itself."""
  video = tmp_path / "play.gif"
  result = dqnfleet(
    "evaluate", "--policy", str(untrained_breakout), "--json", "--video", str(video)
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["episodes"] == 10 and report["policy_version"] == 0
  assert "whole games (all lives), epsilon 0.05, no sticky actions" in report["protocol"]
  assert "Nature DQN protocol" in report["protocol"]
  cap = envs.MAX_EPISODE_FRAMES // envs.ATARI_FRAME_SKIP
  assert all(0 < length < cap for length in report["lengths"]), report["lengths"]
  assert report["median_return"] <= report["max_return"] == max(report["returns"])
  with Image.open(video) as gif:
    assert gif.format == "GIF" and gif.size == (168, 168) and gif.n_frames > 10


def test_the_text_report_names_the_protocol(untrained_breakout):
  result = dqnfleet("evaluate", "--policy", str(untrained_breakout), "--episodes", "2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ALE/Breakout-v5 policy v0: mean return" in result.stdout
  assert "protocol: 2 episodes of whole games (all lives), epsilon 0.05" in result.stdout


def test_dopamines_protocol_is_named_too():
  dopamine = ProtocolConfig(epsilon=0.001, eval_sticky_actions=True)
  line = protocol.describe(dopamine, EnvConfig(env_id="ALE/Breakout-v5"))
  assert "epsilon 0.001, sticky actions 0.25" in line and "Dopamine protocol" in line


def test_a_video_path_that_is_no_gif_is_refused(untrained_breakout, tmp_path):
  result = dqnfleet(
    "evaluate", "--policy", str(untrained_breakout), "--video", str(tmp_path / "play.mp4")
  )
  assert result.returncode == 2
  assert "--video" in result.stderr and "use a path ending in .gif" in result.stderr
  assert not (tmp_path / "play.mp4").exists()


@pytest.mark.slow
def test_the_evaluator_service_keeps_the_best_atari_game_as_a_gif(services, tmp_path):
  """The evaluator `up` and the deployments run (not `evaluate --video`): it follows the
  trainer, evaluates the untrained Breakout v0, records it and keeps its best game."""
  _, trainer_port = start_trainer_without_data(services, tmp_path / "run", "ALE/Breakout-v5")
  out = tmp_path / "eval"
  services(
    "evaluator",
    *service_args(
      "evaluator",
      trainer_address=f"localhost:{trainer_port}",
      out_dir=out,
      status_port=free_port(),
      metrics_port=-1,
      episodes=2,
      eval_num_envs=2,
    ),
  )
  history, video = out / "history.jsonl", out / "best_episode.gif"
  # The GIF is written after the history line: wait for both.
  wait_until(lambda: history.exists() and video.exists(), 600, "the first evaluation's GIF")
  entry = json.loads(history.read_text().splitlines()[0])
  assert entry["version"] == 0 and entry["episodes"] == 2, entry
  with Image.open(video) as gif:
    assert gif.format == "GIF" and gif.size == (168, 168) and gif.n_frames > 10
