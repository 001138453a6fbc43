"""`dqnfleet evaluate` on Atari: the published protocol, episodes that end, and a GIF."""

import json

import pytest
from PIL import Image

from dqnfleet.core.policy import store
from dqnfleet.core.rl import envs, networks, specs
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig, ProtocolConfig
from dqnfleet.evaluator import protocol
from support import dqnfleet


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
