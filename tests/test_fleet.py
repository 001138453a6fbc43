"""The fleet end to end: replay, trainer and two collectors as separate processes on
loopback, with real Reverb, TensorFlow, gymnasium and gRPC between them."""

import json
import math
import re

import grpc
import numpy as np
import pytest
import reverb
import tensorflow as tf

import support
from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.transport import rpc
from support import (
  Service,
  cartpole_collector_args,
  dqnfleet,
  free_port,
  service_args,
  start_trainer_without_data,
  wait_until,
)

pytestmark = pytest.mark.slow  # a fleet of processes for the whole module

ENV = {"DQNFLEET_ENV_ID": "CartPole-v1", "DQNFLEET_LOG_LEVEL": "INFO"}
PUBLISH_EVERY = 50  # the fleet trainer's --publish-every


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
  """Collectors first, then replay, then the trainer: any start order must work."""
  root = tmp_path_factory.mktemp("fleet")
  ports = {
    name: free_port()
    for name in (
      "replay",
      "replay_status",
      "trainer",
      "c0",
      "c1",
      "evaluator",
      "replay_metrics",
      "trainer_metrics",
      "c0_metrics",
      "c1_metrics",
      "evaluator_metrics",
    )
  }
  replay_address = f"localhost:{ports['replay']}"
  trainer_address = f"localhost:{ports['trainer']}"
  replay_args = service_args(
    "replay",
    env_id="CartPole-v1",
    port=ports["replay"],
    status_port=ports["replay_status"],
    metrics_port=ports["replay_metrics"],
    min_size=300,
    checkpoint_dir=root / "replay_ckpt",
    checkpoint_every_s=0,
  )
  trainer_args = service_args(
    "trainer",
    env_id="CartPole-v1",
    replay_addresses=(replay_address,),
    port=ports["trainer"],
    metrics_port=ports["trainer_metrics"],
    run_dir=root / "run",
    publish_every=PUBLISH_EVERY,
    checkpoint_every=200,
    log_every_s=2,
  )
  procs = {}
  for i in (0, 1):
    procs[f"c{i}"] = Service(
      f"collector-{i}",
      service_args(
        "collector",
        env_id="CartPole-v1",
        replay_addresses=(replay_address,),
        trainer_address=trainer_address,
        collector_id=f"c{i}",
        num_envs=4,
        status_port=ports[f"c{i}"],
        metrics_port=ports[f"c{i}_metrics"],
      ),
      root,
      {**ENV, **({"DQNFLEET_LOG_FORMAT": "json"} if i else {})},
    )
  wait_until(
    lambda: "connecting to replay" in procs["c0"].log(),
    90,
    "collector to report that replay is down",
  )
  procs["replay"] = Service("replay", replay_args, root, ENV)
  procs["trainer"] = Service("trainer", trainer_args, root, ENV)
  procs["evaluator"] = Service(
    "evaluator",
    service_args(
      "evaluator",
      trainer_address=trainer_address,
      every_versions=1,
      every_minutes=0,
      episodes=3,
      eval_num_envs=3,
      out_dir=root / "eval",
      status_port=ports["evaluator"],
      metrics_port=ports["evaluator_metrics"],
    ),
    root,
    ENV,
  )
  state = {
    "procs": procs,
    "ports": ports,
    "root": root,
    "replay_args": replay_args,
    "trainer_args": trainer_args,
    "replay_address": replay_address,
    "trainer_address": trainer_address,
  }
  yield state
  for name in ("evaluator", "c0", "c1", "trainer", "replay"):
    procs[name].stop()


def status(fleet, name):
  port = fleet["ports"]["replay_status" if name == "replay" else name]
  return rpc.get_status(f"localhost:{port}", timeout=5)


def test_a_collector_whose_replay_is_down_says_so_and_retries(fleet):
  log = fleet["procs"]["c0"].log()
  assert re.search(r"connecting to replay at localhost:\d+ failed .*retrying in", log), log[-2000:]
  # ...and once replay is up, its items arrive.
  wait_until(lambda: status(fleet, "c0").counters.env_steps > 0, 120, "c0 to collect")


def test_items_from_both_collectors_reach_the_replay_table(fleet):
  wait_until(lambda: status(fleet, "replay").replay_size >= 300, 180, "replay to fill to min size")
  sources = {status(fleet, name).counters.source_id: name for name in ("c0", "c1")}
  assert len(sources) == 2
  client = reverb.Client(fleet["replay_address"])

  def sampled_sources():
    samples = client.sample(
      specs.TABLE, num_samples=300, emit_timesteps=False, unpack_as_table_signature=True
    )
    return {int(specs.unpack_step(s.data["step"])["collector"]) for s in samples}

  wait_until(lambda: set(sources) <= sampled_sources(), 120, "items of both collectors")


def test_the_trainer_trains_and_publishes_increasing_versions(fleet):
  first = wait_until(
    lambda: (s := status(fleet, "trainer")).policy_version >= PUBLISH_EVERY and s,
    240,
    "a first published version",
  )
  later = wait_until(
    lambda: (s := status(fleet, "trainer")).policy_version > first.policy_version and s,
    120,
    "a newer version",
  )
  assert later.counters.train_steps > first.counters.train_steps
  assert (
    later.policy_version % PUBLISH_EVERY == 0 or later.policy_version == later.counters.train_steps
  )
  # On disk, besides the publisher's hidden temporaries: a directory
  # v<train step, 12 digits> per version, each a multiple of the publish
  # period and none skipped, the newest keep_policies (5) of them (6 for the
  # moment between writing a new one and removing the oldest).
  policies = fleet["root"] / "run" / "policies"
  names = sorted(p.name for p in policies.iterdir() if not p.name.startswith("."))
  assert all(re.fullmatch(r"v\d{12}", name) for name in names), names
  versions = [int(name[1:]) for name in names]
  assert 2 <= len(versions) <= 6, names
  assert versions == list(range(versions[0], versions[-1] + 1, PUBLISH_EVERY)), names
  assert versions[0] % PUBLISH_EVERY == 0, names
  assert versions[-1] >= later.policy_version
  manifest = json.loads((policies / names[-1] / "manifest.json").read_text())
  assert manifest["version"] == versions[-1]
  # What the trainer serves is the newest version on disk, or a newer one.
  now = wait_until(
    lambda: (s := status(fleet, "trainer")).policy_version >= versions[-1] and s,
    30,
    f"the trainer to serve v{versions[-1]}, the newest on disk, or newer",
  )
  assert now.policy_version % PUBLISH_EVERY == 0 and now.policy_version <= now.counters.train_steps


def test_both_collectors_switch_to_each_new_version(fleet):
  for _ in range(3):
    published = status(fleet, "trainer").policy_version
    acting = [
      wait_until(
        lambda: (v := status(fleet, name).policy_version) >= published and (v,),
        60,
        f"{name} to act with v{published}",
      )[0]
      for name in ("c0", "c1")
    ]
    # Newer than any version a collector acts with: each round is a switch for both.
    wait_until(
      lambda: status(fleet, "trainer").policy_version > max(acting), 120, "a newer version"
    )
  for name in ("c0", "c1"):
    collector = status(fleet, name)
    assert collector.counters.policy_updates >= 3
    assert "acting with policy v" in fleet["procs"][name].log()


def test_epsilon_follows_the_agent_steps_of_the_whole_fleet(fleet):
  """Each collector decays epsilon with replay's insert count (both collectors' steps),
  not with its own steps or the policy version."""
  from dqnfleet.collector.exploration import epsilon_at
  from dqnfleet.core.settings.config import CollectorConfig

  config = CollectorConfig(epsilon_decay_steps=8_000, epsilon_end=0.02)  # classic defaults

  def counting_both():
    c0, c1 = status(fleet, "c0").counters, status(fleet, "c1").counters
    # More steps than its own: only possible if each counts the other's too.
    return c0.fleet_env_steps > c0.env_steps and c1.fleet_env_steps > c1.env_steps and (c0, c1)

  c0, c1 = wait_until(counting_both, 180, "collectors to count each other's steps")
  for counters in (c0, c1):
    # Snapshots are taken while the collector runs: epsilon may trail by one update.
    assert counters.epsilon == pytest.approx(epsilon_at(counters.fleet_env_steps, config), abs=0.1)
  replay = status(fleet, "replay").counters.items_inserted
  assert max(c0.fleet_env_steps, c1.fleet_env_steps) <= replay


def test_the_evaluator_follows_versions_and_reports(fleet):
  history = fleet["root"] / "eval" / "history.jsonl"

  def evaluations():
    lines = history.read_text().splitlines() if history.exists() else []
    return len(lines) >= 3 and [json.loads(line) for line in lines]

  entries = wait_until(evaluations, 300, "three evaluations")
  versions = [e["version"] for e in entries]
  assert versions == sorted(set(versions)) and versions[-1] > 0  # newer versions, each once
  for entry in entries:
    assert entry["episodes"] == 3 and len(entry["returns"]) == 3
    assert entry["min_return"] <= entry["median_return"] <= entry["max_return"]
    assert entry["mean_length"] > 0 and entry["fleet_env_steps"] >= 0
    assert "3 episodes, epsilon 0.05" in entry["protocol"]
  rows = (fleet["root"] / "eval" / "history.csv").read_text().splitlines()
  assert rows[0].startswith("version,minutes,frames") and len(rows) >= len(entries) + 1
  reply = status(fleet, "evaluator")
  assert reply.role == "evaluator" and reply.counters.evaluations >= 3
  assert reply.policy_version >= versions[-1] and len(reply.recent_returns) == 3
  result = dqnfleet("status", f"localhost:{fleet['ports']['evaluator']}", timeout=60)
  assert "evaluator" in result.stdout and "last_mean_return" in result.stdout


def scrape(fleet, name) -> dict[str, float]:
  """One scrape of a service's /metrics: {sample name with labels: value}."""
  return support.scrape(fleet["ports"][f"{name}_metrics"])


def test_every_service_serves_prometheus_metrics_that_rise_while_it_trains(fleet):
  rising = {
    "replay": ["dqnfleet_replay_inserts_total", "dqnfleet_replay_samples_total"],
    "trainer": ["dqnfleet_trainer_train_steps_total"],
    "c0": ["dqnfleet_collector_env_steps_total", "dqnfleet_collector_items_total"],
    "c1": ["dqnfleet_collector_env_steps_total"],
  }
  wait_until(
    lambda: scrape(fleet, "trainer").get("dqnfleet_trainer_train_steps_total", 0) > 0,
    240,
    "train steps in the trainer's metrics",
  )
  first = {name: scrape(fleet, name) for name in rising}
  for name, metrics in rising.items():
    for metric in metrics:
      wait_until(
        lambda: scrape(fleet, name)[metric] > first[name][metric],
        120,
        f"{name}'s {metric} to rise above {first[name][metric]}",
      )
  replay = scrape(fleet, "replay")
  assert 0 < replay["dqnfleet_replay_table_size"] <= replay["dqnfleet_replay_table_max_size"]
  assert "dqnfleet_replay_insert_blocked_seconds_total" in replay
  trainer = scrape(fleet, "trainer")
  assert trainer["dqnfleet_trainer_policy_version"] > 0
  assert trainer["dqnfleet_trainer_publishes_total"] >= 1
  assert trainer["dqnfleet_trainer_policy_bytes"] > 1000
  # two collectors and the evaluator follow the policy stream
  assert trainer["dqnfleet_trainer_policy_watchers"] >= 3
  assert math.isfinite(trainer["dqnfleet_trainer_loss"])
  assert math.isfinite(trainer["dqnfleet_trainer_mean_q"])
  collector = wait_until(
    lambda: (m := scrape(fleet, "c0"))["dqnfleet_collector_episodes_total"] > 0 and m,
    120,
    "a finished episode in c0's metrics",
  )
  assert (
    collector["dqnfleet_collector_episode_return_count"]
    == collector["dqnfleet_collector_episodes_total"]
  )
  assert 0 <= collector["dqnfleet_collector_epsilon"] <= 1
  assert any(k.startswith("dqnfleet_build_info{") and "role=collector" in k for k in collector)
  evaluator = wait_until(
    lambda: (m := scrape(fleet, "evaluator"))["dqnfleet_evaluator_evaluations_total"] > 0 and m,
    300,
    "an evaluation in the evaluator's metrics",
  )
  assert evaluator["dqnfleet_evaluator_policy_version"] > 0
  assert evaluator["dqnfleet_evaluator_return_max"] >= evaluator["dqnfleet_evaluator_return_mean"]


def scalars(logdir) -> dict[str, list[float]]:
  """Every scalar in the TensorBoard event files under `logdir`: {tag: values}."""
  found = {}
  for path in logdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        found.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  return found


def test_collectors_and_the_evaluator_summaries_reach_the_trainers_tensorboard(fleet):
  logdir = fleet["root"] / "run" / "tensorboard"
  # The trainer flushes reported summaries every 10 s.
  collectors = wait_until(
    lambda: (t := scalars(logdir / "collectors")).get("collector/episode_return") and t,
    120,
    "collector episode returns in TensorBoard",
  )
  assert "collector/episode_length" in collectors
  assert all(value >= 0 for value in collectors["collector/episode_return"])
  evaluator = wait_until(
    lambda: (t := scalars(logdir / "evaluator")).get("evaluator/mean_return") and t,
    300,
    "evaluation returns in TensorBoard",
  )
  assert "evaluator/max_return" in evaluator
  assert "trainer/loss" in scalars(logdir / "trainer")


def test_a_bad_summary_report_is_refused_with_a_reason_and_writes_nothing(fleet):
  with rpc.channel(fleet["trainer_address"]) as channel:
    stub = fleet_pb2_grpc.SummaryServiceStub(channel)
    for report, reason in [
      (fleet_pb2.SummaryReport(role="trainer", source_id="x"), "may not report"),
      (
        fleet_pb2.SummaryReport(
          role="collector",
          source_id="x",
          scalars=[
            fleet_pb2.Scalar(tag="ok", step=1, value=1.0),
            fleet_pb2.Scalar(tag="../../etc", step=1, value=float("nan")),
          ],
        ),
        "not a finite number",
      ),
      (
        fleet_pb2.SummaryReport(
          role="collector",
          source_id="x",
          scalars=[fleet_pb2.Scalar(tag="bad tag!", step=1, value=1.0)],
        ),
        "is not allowed",
      ),
    ]:
      with pytest.raises(grpc.RpcError) as refused:
        stub.Report(report, timeout=10)
      assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert reason in refused.value.details()
  assert "ok" not in scalars(fleet["root"] / "run" / "tensorboard" / "collectors")


def test_services_record_their_settings_versions_and_revision(fleet):
  records = json.loads((fleet["root"] / "run" / "run.json").read_text())
  trainer = records["trainer"]
  assert trainer["config"]["TrainerConfig"]["run_dir"] == str(fleet["root"] / "run")
  assert trainer["config"]["EnvConfig"]["env_id"] == "CartPole-v1"
  assert trainer["packages"]["tensorflow"] == "2.15.1"
  assert trainer["packages"]["dm-reverb"] == "0.14.0"
  assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", trainer["git_revision"])  # tests run in a checkout
  evaluator = json.loads((fleet["root"] / "eval" / "run.json").read_text())["evaluator"]
  assert evaluator["config"]["ProtocolConfig"]["episodes"] == 3
  # Collectors have no directory: their record is their first log line.
  log = fleet["procs"]["c0"].log()
  assert re.search(r"run record: \{.*\"collector_id\": \"c0\"", log), log[:3000]


def test_json_logs_carry_time_level_service_instance_and_message(fleet):
  lines = [line for line in fleet["procs"]["c1"].log().splitlines() if line.startswith("{")]
  assert len(lines) >= 3
  for line in lines:
    entry = json.loads(line)
    assert entry["service"] == "collector" and entry["instance"] == "c1"
    assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    assert entry["time"].endswith("+00:00") and entry["message"]
  assert any("acting with policy v" in json.loads(line)["message"] for line in lines)


def test_items_with_impossible_values_or_shapes_are_left_out_and_the_trainer_trains_on(fleet):
  wait_until(lambda: status(fleet, "trainer").counters.train_steps > 0, 240, "training")
  client = reverb.Client(fleet["replay_address"])
  obs = np.zeros(4, np.float32)
  # Values no collector writes: left out of training and deleted from the table.
  layout = replay_io.ItemLayout(stack=1, n_step=1)  # the fleet's CartPole items
  writer = replay_io.RowWriter(client, layout)
  for action, reward in ((0, float("nan")), (99, 1.0)):
    writer.append(**specs.row(obs, 0, 0, 1, -1, 0))
    writer.append(**specs.row(obs, action, reward, 1.0, 1, 0))
    writer.create_item()
    writer.end_episode(timeout_ms=10_000)
  writer.close()
  # A rogue client that skips the writer's checks: Reverb 0.14's server
  # stores what it is sent, whatever the table signature says.
  for frame in (np.zeros(5, np.float32), np.zeros(4, np.float64)):  # wrong shape, wrong dtype
    rogue = replay_io.RowWriter(client, layout, validate=False)
    for _ in range(2):
      rogue.append(**specs.row(frame, 0, 1.0, 1.0, 1, 0))
    rogue.create_item()
    rogue.end_episode(timeout_ms=10_000)
    rogue.close()
  wait_until(
    lambda: status(fleet, "trainer").counters.bad_items_dropped >= 3,
    240,
    "the trainer to drop the invalid items",
  )
  wait_until(
    lambda: status(fleet, "trainer").counters.unreadable_items_skipped >= 1,
    240,
    "the trainer to skip the item of another dtype",
  )
  steps = status(fleet, "trainer").counters.train_steps
  wait_until(
    lambda: status(fleet, "trainer").counters.train_steps > steps,
    120,
    "the trainer to go on training",
  )
  assert fleet["procs"]["trainer"].proc.poll() is None
  log = fleet["procs"]["trainer"].log()
  for problem in (
    "a step value is not finite",
    "an action is not one of the environment's",
    "its shapes are not the table signature's",
    "skipped a replay item that does not match the table signature",
  ):
    assert problem in log, problem
  metrics = scrape(fleet, "trainer")
  assert metrics["dqnfleet_trainer_bad_items_dropped_total"] >= 3
  assert metrics["dqnfleet_trainer_unreadable_items_skipped_total"] >= 1


def test_status_command_reports_every_service(fleet):
  ports = fleet["ports"]
  addresses = [f"localhost:{ports[n]}" for n in ("replay_status", "trainer", "c0", "c1")]
  result = dqnfleet("status", "--json", *addresses, timeout=60)
  assert result.returncode == 0, result.stderr
  reports = json.loads(result.stdout)
  assert [r["role"] for r in reports] == ["replay", "trainer", "collector", "collector"]
  assert reports[0]["replay_size"] > 0 and reports[1]["counters"]["train_steps"] > 0
  assert reports[2]["id"] == "c0" and reports[2]["policy_version"] > 0
  text = dqnfleet("status", *addresses[:2], timeout=60)
  assert "replay" in text.stdout and "train_steps" in text.stdout
  down = dqnfleet("status", f"localhost:{free_port()}", timeout=60)
  assert down.returncode == 1 and "unreachable" in down.stdout


def test_health_endpoints_answer_serving(fleet):
  for port in ("replay_status", "trainer", "c0", "c1", "evaluator"):
    address = f"localhost:{fleet['ports'][port]}"
    assert dqnfleet("health", address, timeout=60).returncode == 0
    assert dqnfleet("health", "--ready", address, timeout=60).returncode == 0, port
  assert dqnfleet("health", f"localhost:{free_port()}", timeout=60).returncode == 1


def test_a_trainer_past_its_step_limit_can_stay_up_serving_its_final_policy(
  fleet, services, tmp_path
):
  wait_until(lambda: status(fleet, "replay").replay_size >= 300, 180, "data in replay")
  port = free_port()
  trainer = services(
    "trainer-limited",
    *service_args(
      "trainer",
      env_id="CartPole-v1",
      replay_addresses=(fleet["replay_address"],),
      port=port,
      run_dir=tmp_path / "limited",
      max_train_steps=30,
      publish_every=10,
    ),
    env={"DQNFLEET_SERVE_AFTER_MAX_STEPS": "true"},
  )
  wait_until(
    lambda: "reached --max-train-steps 30; serving policy v30" in trainer.log(),
    180,
    "the trainer to reach its limit",
  )
  assert trainer.proc.poll() is None  # still up: no exit for a supervisor to restart
  reply = rpc.get_status(f"localhost:{port}")
  assert reply.policy_version == 30 and reply.counters.train_steps == 30
  assert dqnfleet("health", "--ready", f"localhost:{port}", timeout=60).returncode == 0
  assert trainer.stop() == 0


def test_a_collector_without_replay_is_alive_but_not_ready(services, tmp_path):
  port = free_port()
  collector = services("collector", *cartpole_collector_args(free_port(), free_port(), port))
  wait_until(lambda: "connecting to replay" in collector.log(), 120, "the collector to start")
  address = f"localhost:{port}"
  assert dqnfleet("health", address, timeout=60).returncode == 0  # alive: no restart
  assert dqnfleet("health", "--ready", address, timeout=60).returncode == 1  # but no work for it
  assert collector.stop() == 0


def test_evaluate_fetches_the_latest_policy_from_the_trainer(fleet):
  result = dqnfleet("evaluate", "--policy", fleet["trainer_address"], "--episodes", "3", "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["episodes"] == 3 and report["policy_version"] > 0
  assert len(report["returns"]) == 3 and report["min_return"] <= report["mean_return"]


def test_a_restarted_trainer_resumes_from_its_checkpoint(fleet):
  procs = fleet["procs"]
  wait_until(lambda: status(fleet, "trainer").counters.train_steps >= 200, 240, "200 steps")
  before = status(fleet, "trainer").counters.train_steps
  assert procs["trainer"].stop() == 0
  procs["trainer"] = Service("trainer-2", fleet["trainer_args"], fleet["root"], ENV)
  wait_until(lambda: status(fleet, "trainer").counters.train_steps > before, 180, "resumed steps")
  log = procs["trainer"].log()
  assert re.search(r"resumed from .*ckpt-\d+ at train step (\d+)", log), log[-2000:]
  step = int(re.search(r"at train step (\d+)", log).group(1))
  assert step >= before  # a checkpoint is written at shutdown, so no step is lost


def test_replay_restores_its_checkpoint_and_collectors_reconnect(fleet):
  procs = fleet["procs"]
  size = wait_until(lambda: status(fleet, "replay").replay_size, 180, "items in replay")
  assert procs["replay"].stop() == 0
  assert "checkpointed" in procs["replay"].log()
  procs["replay"] = Service("replay-2", fleet["replay_args"], fleet["root"], ENV)
  restored = wait_until(lambda: status(fleet, "replay").replay_size, 120, "replay to come back")
  assert restored >= size
  log = procs["replay"].log()
  assert "restored from" in log, log[-2000:]
  # Collectors' writers reconnect by themselves and insert again; the trainer
  # samples again: nobody needed a restart.
  for name in ("c0", "c1"):
    steps = status(fleet, name).counters.env_steps
    wait_until(
      lambda: status(fleet, name).counters.env_steps > steps + 100,
      180,
      f"{name} to insert into the restarted replay",
    )
    assert procs[name].proc.poll() is None
  trained = status(fleet, "trainer").counters.train_steps
  wait_until(
    lambda: status(fleet, "trainer").counters.train_steps > trained,
    180,
    "the trainer to sample from the restarted replay",
  )


def test_a_trainer_without_data_says_it_is_waiting(services, tmp_path):
  trainer, trainer_port = start_trainer_without_data(services, tmp_path / "run")
  wait_until(
    lambda: "waiting for data: replay holds 0 of the 5000 transitions" in trainer.log(),
    120,
    "the trainer to say it waits for data",
  )
  reply = rpc.get_status(f"localhost:{trainer_port}")
  assert reply.role == "trainer" and reply.counters.train_steps == 0
  assert trainer.stop() == 0  # and it stops cleanly while waiting
