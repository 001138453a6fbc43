"""Partitions heal by themselves: a CartPole fleet whose links are cut for a minute, then healed.

Every link between the services runs through a tests/faults.py Link, a TCP
proxy that holds every byte while it is cut (dropped, not refused). First
replay is cut off from the collector and the trainer, then the trainer's
policy port from the collector. Each peer notices within seconds, says so
once in its log and in its health, nobody dies or is restarted, and work
resumes within seconds of the heal. The test prints what it measured as one
JSON line (docs/failures.md):

    .venv/bin/python -m pytest -s -q tests/test_partition.py | grep '^{'
"""

import json
import re

import pytest

from dqnfleet.core.policy.follower import TRAINER_HEALTH
from dqnfleet.core.transport import rpc
from dqnfleet.trainer.trainer import SHARDS_HEALTH
from faults import Clock, Link
from support import dqnfleet, free_port, service_args, wait_until

PARTITION_S = 60  # what the fleet must ride out without a restart
NOTICE_S = 25  # a partition is noticed within this (keepalive 10 s + 5 s, deadlines)
RESUME_S = 20  # work resumes within this of the heal (backoff capped at 5 s, jittered)


def healthy(port: int, service: str = rpc.READINESS) -> bool:
  return rpc.check_health(f"localhost:{port}", timeout=2, service=service)


def warnings(log: str, pattern: str) -> list[str]:
  return [line for line in log.splitlines() if " WARNING " in line and re.search(pattern, line)]


@pytest.mark.slow
def test_a_minute_long_partition_of_replay_and_of_the_trainers_port_heals_by_itself(
  services, tmp_path
):
  replay_port, replay_status, trainer_port, collector_port = (free_port() for _ in range(4))
  replay_for_trainer, replay_for_collector = Link(replay_port), Link(replay_port)
  trainer_for_collector = Link(trainer_port)
  replay = services(
    "replay",
    *service_args("replay", env_id="CartPole-v1", port=replay_port, status_port=replay_status),
  )
  trainer = services(
    "trainer",
    *service_args(
      "trainer",
      env_id="CartPole-v1",
      replay_addresses=(replay_for_trainer.address,),
      port=trainer_port,
      run_dir=tmp_path / "run",
      publish_every=100,
    ),
  )
  collector = services(
    "collector",
    *service_args(
      "collector",
      env_id="CartPole-v1",
      replay_addresses=(replay_for_collector.address,),
      trainer_address=trainer_for_collector.address,
      status_port=collector_port,
      num_envs=2,
    ),
  )
  trained = lambda: rpc.get_status(f"localhost:{trainer_port}", timeout=5)
  collecting = lambda: rpc.get_status(f"localhost:{collector_port}", timeout=5)
  inserted = lambda: rpc.get_status(f"localhost:{replay_status}", timeout=5).counters
  wait_until(
    lambda: trained().counters.train_steps > 300 and collecting().policy_version > 0,
    240,
    "training, and the collector acting with a trained version",
  )
  measured = {"benchmark": "partition", "partition_s": PARTITION_S}

  # 1. Replay partitioned from both of its clients.
  clock = Clock()
  replay_for_trainer.cut()
  replay_for_collector.cut()
  noticed = clock.until(
    {
      "collector": lambda: not healthy(collector_port),
      "trainer": lambda: not healthy(trainer_port, SHARDS_HEALTH),
    },
    NOTICE_S,
  )
  assert None not in noticed.values(), noticed
  assert trained().counters.replay_shards_up == 0
  # The trainer goes on serving its policies: it stays ready.
  assert healthy(trainer_port)
  wait_until(lambda: clock.elapsed() >= PARTITION_S, PARTITION_S + 5, "the partition's end")
  assert replay_for_trainer.cut_now  # nothing healed it early
  steps, items = trained().counters.train_steps, inserted().items_inserted
  clock = Clock()
  replay_for_trainer.heal()
  replay_for_collector.heal()
  resumed = clock.until(
    {
      "collector": lambda: healthy(collector_port) and inserted().items_inserted > items,
      "trainer": lambda: trained().counters.train_steps > steps,
    },
    RESUME_S,
  )
  assert None not in resumed.values(), (resumed, trainer.log()[-3000:], collector.log()[-3000:])
  measured["replay"] = {"noticed_s": noticed, "resumed_s": resumed}

  # Said once, not at every retry (a retry every few seconds for a minute),
  # and its end too.
  collector_log, trainer_log = collector.log(), trainer.log()
  assert len(warnings(collector_log, "connecting to replay")) <= 2, collector_log[-3000:]
  assert re.search(r"connecting to replay at \S+ succeeded after \d", collector_log)
  assert 1 <= len(warnings(trainer_log, r"replay at \S+ (unreachable|unavailable)")) <= 3, (
    trainer_log[-3000:]
  )
  assert re.search(r"replay at \S+ answers again after \d", trainer_log), trainer_log[-3000:]

  # 2. The trainer's policy port partitioned from the collector.
  clock = Clock()
  trainer_for_collector.cut()
  noticed = clock.until(
    {"collector": lambda: not healthy(collector_port, TRAINER_HEALTH)}, NOTICE_S
  )
  assert noticed["collector"] is not None, collector.log()[-3000:]
  # Read only now: an announcement already on its way when the link was cut
  # may still have been loaded.
  version = collecting().policy_version
  env_steps = collecting().counters.env_steps
  asked = dqnfleet("health", "--name", TRAINER_HEALTH, f"localhost:{collector_port}")
  assert asked.returncode == 1, asked.stderr  # what an operator's probe sees
  wait_until(lambda: clock.elapsed() >= PARTITION_S, PARTITION_S + 5, "the partition's end")
  # It collects on with the version it has, and stays ready: replay still takes its items.
  assert collecting().counters.env_steps > env_steps
  assert collecting().policy_version == version
  assert healthy(collector_port)
  published = trained().policy_version
  assert published > version  # the trainer trained on meanwhile
  clock = Clock()
  trainer_for_collector.heal()
  resumed = clock.until(
    {
      "collector": lambda: (
        healthy(collector_port, TRAINER_HEALTH) and collecting().policy_version >= published
      )
    },
    RESUME_S,
  )
  assert resumed["collector"] is not None, collector.log()[-3000:]
  assert dqnfleet("health", "--name", TRAINER_HEALTH, f"localhost:{collector_port}").returncode == 0
  measured["trainer_port"] = {"noticed_s": noticed, "resumed_s": resumed}
  collector_log = collector.log()
  assert len(warnings(collector_log, "trainer policy API")) <= 3, collector_log[-3000:]
  assert re.search(r"trainer policy API at \S+ answers again after \d", collector_log)

  # Nobody died, nobody needs a restart.
  for service in (replay, trainer, collector):
    assert service.proc.poll() is None, service.log()[-3000:]
  assert collector.stop() == 0 and trainer.stop() == 0 and replay.stop() == 0
  print(json.dumps(measured))
