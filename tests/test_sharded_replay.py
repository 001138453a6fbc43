"""The trainer samples from several replay shards: every shard in proportion to its size, each
priority update and deletion back to the shard its item came from, and on from the others when
one is lost, which rejoins once it answers again.

Real Reverb servers: in this process where none is killed, as `dqnfleet replay` processes
(with checkpoint directories) where one is SIGKILLed and restarted; a real trainer in this
process or as a `dqnfleet trainer` process.
"""

import logging
import re
import signal
import threading

import numpy as np
import pytest
import reverb

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.rl.priorities import PRIORITY_FLOOR
from dqnfleet.core.settings.config import (
  AgentConfig,
  EnvConfig,
  NetworkConfig,
  ReplayConfig,
  TrainerConfig,
)
from dqnfleet.core.transport import rpc
from dqnfleet.replay.server import make_table
from dqnfleet.trainer.trainer import SHARDS_HEALTH, Trainer
from support import free_port, scrape, service_args, wait_until

ENV = EnvConfig(env_id="CartPole-v1", n_step=1)
BATCH = 16
# Sampling never waits on the rate limiter: the tables hold all their items from the start.
TABLE = dict(min_size=10, max_size=1000, samples_per_insert=1000.0, rate_limit_tolerance=100)


def fill(address: str, items: int, version: int) -> None:
  """`items` CartPole items through the collectors' writer, their steps marked `version`."""
  client = reverb.Client(address)
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(specs.env_specs(ENV)))
  rng = np.random.default_rng(version)
  for t in range(items + 1):
    writer.append(**specs.row(rng.normal(size=4).astype(np.float32), t % 2, 1.0, 1.0, version, 0))
    if t:
      writer.create_item()
  writer.flush(0, timeout_ms=10_000)
  writer.close()


def table_info(address: str):
  return reverb.Client(address).server_info(timeout=5)[specs.TABLE]


def sampled(address: str) -> int:
  """Items the shard has handed to samplers since its table was created."""
  return table_info(address).rate_limiter_info.sample_stats.completed


def priorities(address: str) -> dict[int, float]:
  """Every item's priority by key: many samples of a table whose sampler ignores priorities."""
  client = reverb.Client(address)
  return {
    int(s.info.key): s.info.priority
    for s in client.sample(specs.TABLE, num_samples=3000, emit_timesteps=False)
  }


def servers(*configs: ReplayConfig, env: EnvConfig = ENV) -> list[reverb.Server]:
  return [reverb.Server([make_table(env, c)], port=free_port()) for c in configs]


def address(server: reverb.Server) -> str:
  return f"localhost:{server.port}"


def trainer_on(addresses, run_dir) -> Trainer:
  return Trainer(
    ENV,
    NetworkConfig(fc_layers=(32,)),
    AgentConfig(batch_size=BATCH),
    TrainerConfig(replay_addresses=tuple(addresses), port=0, run_dir=str(run_dir)),
    threading.Event(),
  )


def test_shards_are_sampled_by_size_and_priorities_go_back_to_their_own_shard(tmp_path):
  # Priorities are kept but not used to sample (exponent 0), so that reading a table back
  # below sees every item.
  config = ReplayConfig(prioritized=True, priority_exponent=0.0, **TABLE)
  big, small = servers(config, config)
  fill(address(big), 150, version=100)
  fill(address(small), 50, version=200)
  trainer = trainer_on([address(big), address(small)], tmp_path)
  try:
    trainer.replay.connect()
    assert trainer.replay.prioritized and trainer.replay.shards_up == 2
    trainer.replay.start()
    trainer.learner.step(10)  # past the first fetches, which each shard's sampler makes ahead
    before = [sampled(address(s)) for s in (big, small)]
    for _ in range(30):
      result = trainer.learner.step(10)
      assert result.steps == 10 and not len(result.problems)
    grown = [sampled(address(s)) - b for s, b in zip((big, small), before, strict=True)]
    counters = trainer.snapshot().counters

    def updated():
      """Both tables read back (their priorities by key), once the newest batch's priorities
      (sent every 0.1 s by each shard's sender) are in them."""
      tables = [priorities(address(s)) for s in (big, small)]
      return (
        all(
          np.isclose(tables[shard].get(int(key), 1.0), abs(td) + PRIORITY_FLOOR, rtol=1e-5)
          for key, shard, td in zip(result.keys, result.shards, result.td_errors, strict=True)
        )
        and tables
      )

    tables = wait_until(updated, 10, "the newest batch's priorities in the shards they came from")
  finally:
    trainer.replay.close()
  # 3 items in 4 from the shard that holds 3 in 4: 4,800 items, 0.75 +- 0.006 (one sd).
  assert 0.65 < grown[0] / sum(grown) < 0.85, grown
  # Each item says which shard it came from: the versions each shard's items carry.
  np.testing.assert_array_equal(result.policy_versions, np.where(result.shards == 0, 100, 200))
  assert [len(t) for t in tables] == [150, 50]  # every item read back
  # The shard each item was updated in is the one that holds it.
  assert all(int(k) not in tables[1 - s] for k, s in zip(result.keys, result.shards, strict=True))
  # Items enter with priority 1.0: trained-on items of both shards hold |TD error| + floor.
  assert all(any(p != 1.0 for p in t.values()) for t in tables)
  assert (counters.replay_shards, counters.replay_shards_up) == (2, 2)
  assert counters.fleet_env_steps == 200  # both shards' inserts
  assert trainer.snapshot().replay_size == 200
  for server in (big, small):
    server.stop()


def test_a_shard_that_answers_late_joins_the_mix(tmp_path, caplog):
  config = ReplayConfig(**TABLE)
  (first,) = servers(config)
  fill(address(first), 100, version=1)
  late = free_port()
  trainer = trainer_on([address(first), f"localhost:{late}"], tmp_path)
  caplog.set_level(logging.INFO)
  trainer.replay.connect()  # returns once one shard answers
  assert f"replay shard(s) localhost:{late} not answering yet" in caplog.text
  assert trainer.replay.shards_up == 1 and not trainer.replay.all_up()
  second = None
  try:
    trainer.replay.start()
    result = trainer.learner.step(10)
    assert result.steps == 10 and set(result.shards) == {0}
    second = reverb.Server([make_table(ENV, config)], port=late)
    fill(f"localhost:{late}", 100, version=2)
    wait_until(trainer.replay.all_up, 60, "the late shard to join")

    def from_both():
      result = trainer.learner.step(10)
      trainer.replay.after_step(result)  # where the loop changes the mix
      return set(result.shards) == {0, 1}

    wait_until(from_both, 60, "batches from both shards", interval=0)
  finally:
    trainer.replay.close()
  assert re.search(
    rf"replay shard at localhost:{late} answers \(\d+ items\); sampling from 2 of 2 shards",
    caplog.text,
  )
  assert sampled(f"localhost:{late}") > 0
  assert trainer.snapshot().counters.replay_shards_up == 2
  for server in (first, second):
    server.stop()


@pytest.mark.parametrize(
  "other, refusal",
  [
    (
      dict(config=ReplayConfig(prioritized=True, **TABLE)),
      "replay shards sample differently ({a}: uniform, {b}: prioritized); start every shard "
      "with the same --prioritized",
    ),
    (
      dict(config=ReplayConfig(**TABLE), env=EnvConfig(env_id="CartPole-v1", n_step=3)),
      "the replay table at {b} does not match this trainer's environment CartPole-v1",
    ),
  ],
  ids=["sampler", "layout"],
)
def test_shards_that_do_not_agree_are_refused(tmp_path, other, refusal):
  (first,) = servers(ReplayConfig(**TABLE))
  (second,) = servers(other["config"], env=other.get("env", ENV))
  trainer = trainer_on([address(first), address(second)], tmp_path)
  with pytest.raises(SystemExit) as refused:
    trainer.replay.connect()
  assert refusal.format(a=address(first), b=address(second)) in str(refused.value)
  for server in (first, second):
    server.stop()


# --- a lost shard: `dqnfleet replay` processes and a `dqnfleet trainer` ------------------------


def start_shard(services, name: str, port: int, checkpoint_dir):
  return services(
    name,
    *service_args(
      "replay",
      env_id="CartPole-v1",
      port=port,
      status_port=free_port(),
      checkpoint_dir=checkpoint_dir,
      checkpoint_every_s=0,  # the test asks for the checkpoint it needs
      # Updates to a shard just lost must not hold up training on the other.
      prioritized=True,
      **TABLE,
    ),
  )


@pytest.mark.slow
def test_the_trainer_trains_on_without_a_lost_shard_which_rejoins_from_its_checkpoint(
  services, tmp_path
):
  ports = [free_port(), free_port()]
  addresses = [f"localhost:{p}" for p in ports]
  shard_dirs = [tmp_path / f"replay-{i}" for i in (0, 1)]
  shards = [start_shard(services, f"replay-{i}", ports[i], shard_dirs[i]) for i in (0, 1)]
  for a in addresses:
    wait_until(lambda a=a: table_info(a), 60, f"replay at {a}")
  fill(addresses[0], 300, version=0)
  fill(addresses[1], 100, version=0)
  reverb.Client(addresses[1]).checkpoint()  # what the killed shard restores
  trainer_port, metrics_port = free_port(), free_port()
  trainer = services(
    "trainer",
    *service_args(
      "trainer",
      env_id="CartPole-v1",
      replay_addresses=tuple(addresses),
      port=trainer_port,
      metrics_port=metrics_port,
      run_dir=tmp_path / "run",
      log_every_s=1,
    ),
    env={"DQNFLEET_LOG_LEVEL": "INFO"},
  )
  status = lambda: rpc.get_status(f"localhost:{trainer_port}", timeout=5).counters
  health = lambda name: rpc.check_health(f"localhost:{trainer_port}", service=name)
  up_metric = f"dqnfleet_trainer_replay_shard_up{{shard={addresses[1]}}}"

  # Both shards are sampled.
  wait_until(lambda: status().train_steps > 0, 120, "the trainer to train")
  # More than each shard's sampler fetches ahead (2 batches, and 4 in tf.data's prefetch):
  # items trained on.
  before = [sampled(a) for a in addresses]
  wait_until(
    lambda: all(sampled(a) > b + 2000 for a, b in zip(addresses, before, strict=True)),
    60,
    "samples from both shards",
  )
  assert (status().replay_shards, status().replay_shards_up) == (2, 2)
  assert "replay samples by priority" in trainer.log()
  wait_until(lambda: health(SHARDS_HEALTH), 10, "the shards' health to say all are up")

  # One shard lost: training goes on from the other, and says so.
  shards[1].proc.send_signal(signal.SIGKILL)
  shards[1].proc.wait()
  wait_until(lambda: status().replay_shards_up == 1, 30, "the trainer to see the lost shard")
  assert f"lost replay shard at {addresses[1]}" in trainer.log()
  assert "training on from 1 of 2 shards" in trainer.log()
  steps = status().train_steps
  wait_until(lambda: status().train_steps > steps + 100, 60, "training to go on")
  # Health follows every second: lost shards show, readiness stays.
  wait_until(lambda: not health(SHARDS_HEALTH), 10, "the shards' health to say one is lost")
  assert health(rpc.READINESS)
  metrics = scrape(metrics_port)
  assert metrics["dqnfleet_trainer_replay_shards"] == 2
  assert metrics["dqnfleet_trainer_replay_shards_up"] == 1 and metrics[up_metric] == 0

  # Restarted on its checkpoint directory, it rejoins the same trainer process.
  restarted = start_shard(services, "replay-1-again", ports[1], shard_dirs[1])
  wait_until(lambda: status().replay_shards_up == 2, 120, "the shard to rejoin")
  assert "restored from" in restarted.log()
  assert f"replay shard at {addresses[1]} answers again (100 items)" in trainer.log()
  rejoined, steps = sampled(addresses[1]), status().train_steps
  wait_until(lambda: sampled(addresses[1]) > rejoined + 2000, 60, "samples from the rejoined shard")
  wait_until(lambda: status().train_steps > steps + 100, 60, "training to go on")
  wait_until(lambda: health(SHARDS_HEALTH), 10, "the shards' health to say all are up again")
  assert scrape(metrics_port)[up_metric] == 1
  # Restored with the priorities it entered with, it is sent new ones again.
  wait_until(lambda: any(p != 1.0 for p in priorities(addresses[1]).values()), 30, "new priorities")
  assert trainer.proc.poll() is None and trainer.log().count("training CartPole-v1 from") == 1
  assert trainer.stop() == 0
  for shard in (shards[0], restarted):
    shard.stop()
