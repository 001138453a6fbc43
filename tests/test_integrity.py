"""Files are checked before they are trusted: published policies and training checkpoints."""

import logging
import threading

import pytest

from dqnfleet.core.policy import client, store
from dqnfleet.core.policy.server import PolicyPublisher
from dqnfleet.core.rl import networks, specs
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, TrainerConfig
from dqnfleet.core.transport.security import PLAINTEXT
from dqnfleet.core.transport.status import Report, StatusServicer, TrainerCounters
from dqnfleet.trainer.trainer import Trainer

ENV = EnvConfig(env_id="CartPole-v1", n_step=1, clip_rewards=False)
NET = NetworkConfig(fc_layers=(16,))


def publish(policies, *versions):
  network = networks.q_net(specs.env_specs(ENV), NET)
  for version in versions:
    store.publish(policies, version, network, ENV, NET, keep=5)


def test_a_damaged_newest_policy_is_moved_aside_and_never_served(tmp_path, caplog):
  policies = tmp_path / "policies"
  publish(policies, 100, 200)
  weights = store.version_dir(policies, 200) / "weights.data-00000-of-00001"
  weights.write_bytes(weights.read_bytes()[:10])  # truncated, as by a crash or a full disk
  with caplog.at_level(logging.WARNING):
    publisher = PolicyPublisher(str(policies), ENV, NET, keep=5)
  assert publisher.latest_version == 100
  assert store.list_versions(policies) == [100]
  assert (policies / ".damaged-v000000000200").is_dir()  # kept for a look, out of the way
  assert "published policy v200 is damaged" in caplog.text and str(weights) in caplog.text
  assert store.damage(store.version_dir(policies, 100)) is None


def test_announced_versions_never_go_back_after_a_restart(tmp_path):
  policies = tmp_path / "policies"
  publish(policies, 100, 300)  # v300 published, then a crash before the next checkpoint
  publisher = PolicyPublisher(str(policies), ENV, NET, keep=5)
  network = networks.q_net(specs.env_specs(ENV), NET)
  publisher.publish(200, network)  # the trainer resumed from its step-200 checkpoint
  assert publisher.latest_version == 300
  publisher.publish(400, network)
  assert publisher.latest_version == 400
  assert store.list_versions(policies) == [100, 300, 400]


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_intact_one(tmp_path, caplog):
  config = TrainerConfig(run_dir=str(tmp_path / "run"), replay_addresses=("localhost:1",))
  agent = AgentConfig(batch_size=8)
  trainer = Trainer(ENV, NET, agent, config, threading.Event())
  for step in (10, 20):
    trainer.learner.train_step.assign(step)
    trainer.checkpoints.save()
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


def test_fetch_serves_only_what_matches_the_manifest_and_names_what_is_wrong(tmp_path):
  import grpc

  from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
  from dqnfleet.core.transport import rpc

  policies = tmp_path / "policies"
  publish(policies, 50, 75, 100, 200)
  publisher = PolicyPublisher(str(policies), ENV, NET, keep=5)
  status = StatusServicer("trainer", "test", ENV.env_id, lambda: Report(TrainerCounters()))
  server, port = rpc.start_server(
    0,
    status,
    security=PLAINTEXT,
    extra=lambda s: fleet_pb2_grpc.add_PolicyServiceServicer_to_server(publisher, s),
  )
  try:
    with rpc.channel(f"localhost:{port}") as channel:
      stub = fleet_pb2_grpc.PolicyServiceStub(channel)
      latest = stub.GetLatestPolicy(fleet_pb2.GetLatestPolicyRequest(), timeout=10)
      fetched = client.fetch(stub, latest, tmp_path / "collector")
      assert store.damage(fetched) is None and latest.version == 200
      # Older versions too, more than the publisher keeps in memory at once.
      for version in (75, 50, 200):
        info = fleet_pb2.PolicyVersion(
          version=version,
          files=[
            fleet_pb2.PolicyFile(name=n, size_bytes=size, sha256=h)
            for n, size, h in store.file_digests(store.version_dir(policies, version))
          ],
        )
        assert store.damage(client.fetch(stub, info, tmp_path / "collector")) is None

      def fetch_error(**request) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
          list(stub.FetchPolicy(fleet_pb2.FetchPolicyRequest(**request), timeout=10))
        return raised.value

      # Damaged on disk after the publisher checked it at start: refused, never served.
      weights = store.version_dir(policies, 100) / "weights.data-00000-of-00001"
      weights.write_bytes(b"garbage")
      error = fetch_error(version=100)
      assert error.code() == grpc.StatusCode.DATA_LOSS and str(weights) in error.details()

      error = fetch_error(version=150)
      assert error.code() == grpc.StatusCode.NOT_FOUND
      assert "v150 is not kept; kept versions: [50, 75, 100, 200]" in error.details()

      error = fetch_error(version=200, max_chunk_bytes=-1)
      assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert "max_chunk_bytes" in error.details() and "-1" in error.details()

      # Small chunks reassemble to the same files.
      chunks = list(
        stub.FetchPolicy(fleet_pb2.FetchPolicyRequest(version=200, max_chunk_bytes=100))
      )
      assert max(len(c.data) for c in chunks) == 100
      assert sum(len(c.data) for c in chunks) == sum(f.size_bytes for f in latest.files)
  finally:
    server.stop(grace=0)
