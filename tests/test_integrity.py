"""Files are checked before they are trusted: published policies and training checkpoints."""
import logging
import threading

import pytest

from dqnfleet.core import networks, policy_store, specs
from dqnfleet.core.config import AgentConfig, EnvConfig, NetworkConfig, TrainerConfig
from dqnfleet.trainer.publisher import PolicyPublisher
from dqnfleet.trainer.trainer import Trainer

ENV = EnvConfig(env_id="CartPole-v1", n_step=1, clip_rewards=False)
NET = NetworkConfig(fc_layers=(16,))


def publish(policies, *versions):
  network = networks.q_net(specs.env_specs(ENV), NET)
  for version in versions:
    policy_store.publish(policies, version, network, ENV, NET, keep=5)


def test_a_damaged_newest_policy_is_moved_aside_and_never_served(tmp_path, caplog):
  policies = tmp_path / "policies"
  publish(policies, 100, 200)
  weights = policy_store.version_dir(policies, 200) / "weights.data-00000-of-00001"
  weights.write_bytes(weights.read_bytes()[:10])  # truncated, as by a crash or a full disk
  with caplog.at_level(logging.WARNING):
    publisher = PolicyPublisher(str(policies), ENV, NET, keep=5)
  assert publisher.latest_version == 100
  assert policy_store.list_versions(policies) == [100]
  assert (policies / ".damaged-v000000000200").is_dir()  # kept for a look, out of the way
  assert "published policy v200 is damaged" in caplog.text and str(weights) in caplog.text
  assert policy_store.damage(policy_store.version_dir(policies, 100)) is None


def test_announced_versions_never_go_back_after_a_restart(tmp_path):
  policies = tmp_path / "policies"
  publish(policies, 100, 300)  # v300 published, then a crash before the next checkpoint
  publisher = PolicyPublisher(str(policies), ENV, NET, keep=5)
  network = networks.q_net(specs.env_specs(ENV), NET)
  publisher.publish(200, network)  # the trainer resumed from its step-200 checkpoint
  assert publisher.latest_version == 300
  publisher.publish(400, network)
  assert publisher.latest_version == 400
  assert policy_store.list_versions(policies) == [100, 300, 400]


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_intact_one(tmp_path, caplog):
  config = TrainerConfig(run_dir=str(tmp_path / "run"), replay_address="localhost:1")
  agent = AgentConfig(batch_size=8)
  trainer = Trainer(ENV, NET, agent, config, threading.Event())
  for step in (10, 20):
    trainer.train_step.assign(step)
    trainer.checkpoints.save(checkpoint_number=step)
  newest = trainer.checkpoints.latest_checkpoint
  data = next((tmp_path / "run" / "checkpoints").glob("ckpt-20.data-*"))
  data.write_bytes(b"garbage" * 100)
  with caplog.at_level(logging.INFO):
    resumed = Trainer(ENV, NET, agent, config, threading.Event())
  assert resumed.step == 10
  assert f"checkpoint {newest} is unreadable" in caplog.text
  for path in (tmp_path / "run" / "checkpoints").glob("ckpt-10.*"):
    path.write_bytes(b"garbage")
  with pytest.raises(SystemExit, match="no intact training checkpoint"):
    Trainer(ENV, NET, agent, config, threading.Event())
