"""A collector writes to every replay shard, and keeps writing when one of them is lost.

Two real replay servers and a real collector process; one shard is killed
with SIGKILL and restarted from its checkpoint directory.
"""

import re
import signal

import pytest

from dqnfleet.core.transport import rpc
from support import free_port, service_args, wait_until

pytestmark = pytest.mark.slow


def start_shard(services, name, port, status_port, checkpoint_dir):
  return services(
    name,
    *service_args(
      "replay",
      env_id="CartPole-v1",
      port=port,
      status_port=status_port,
      checkpoint_dir=checkpoint_dir,
      checkpoint_every_s=2,
      # No trainer samples: below its min size the rate limiter lets every insert in.
      min_size=100_000,
      max_size=100_000,
    ),
  )


def inserted(status_port: int) -> int:
  return rpc.get_status(f"localhost:{status_port}", timeout=5).counters.items_inserted


def test_a_collector_spreads_its_writes_and_survives_a_lost_shard(services, tmp_path):
  ports = [(free_port(), free_port()) for _ in range(2)]
  shards = [
    start_shard(services, f"replay-{i}", port, status, str(tmp_path / f"replay-{i}"))
    for i, (port, status) in enumerate(ports)
  ]
  collector = services(
    "collector",
    *service_args(
      "collector",
      env_id="CartPole-v1",
      replay_addresses=tuple(f"localhost:{port}" for port, _ in ports),
      trainer_address=f"localhost:{free_port()}",  # no trainer: it acts at random
      status_port=free_port(),
      num_envs=4,
    ),
  )
  # Its 4 environments write to both shards.
  wait_until(lambda: min(inserted(s) for _, s in ports) > 200, 120, "items in both shards")

  # Killed once it has checkpointed some of its items.
  wait_until(lambda: re.search(r"checkpointed [1-9]\d* items", shards[1].log()), 60, "a checkpoint")
  shards[1].proc.send_signal(signal.SIGKILL)
  shards[1].proc.wait()
  survivor_before = inserted(ports[0][1])
  # All four environments write to the shard that is left.
  wait_until(
    lambda: "lost replay shard" in collector.log(), 60, "the collector to log the lost shard"
  )
  wait_until(
    lambda: inserted(ports[0][1]) > survivor_before + 300, 120, "writes going on to shard 0"
  )
  assert collector.proc.poll() is None

  # Restarted on its checkpoint directory, the shard gets writes again.
  restarted = start_shard(services, "replay-1-again", *ports[1], str(tmp_path / "replay-1"))
  restored = wait_until(lambda: inserted(ports[1][1]), 120, "the shard back with its items")
  wait_until(lambda: inserted(ports[1][1]) > restored + 200, 120, "writes to the restarted shard")
  assert "answers again" in collector.log()
  assert "restored from" in restarted.log()
  assert collector.stop() == 0
