"""`docker compose up` runs the fleet, with replay in two shards
(docker-compose.shards.yml); collectors scale with --scale.

Needs a Docker engine and the python:3.11-slim-bookworm base image (.ci/run
provides both with ../shared/tools). Outside CI the test is skipped without
them; in CI (CI=true) it fails instead, so a broken engine is never silent.
The shards override's rendering needs only a compose binary.
"""

import fnmatch
import json
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest
import yaml

from support import ROOT, compose_config, compose_default, flag_values, wait_until

PROJECT = f"dqnfleettest{os.getpid()}"
# The fleet of these tests: two replay shards, replay and replay-1.
FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.shards.yml")
SHARDS = ("replay", "replay-1")
MIN_SIZE = 300
SETTINGS = {
  "DQNFLEET_ENV_ID": "CartPole-v1",
  "DQNFLEET_MIN_SIZE": str(MIN_SIZE),
  "DQNFLEET_MAX_SIZE": "20000",
  "DQNFLEET_PUBLISH_EVERY": "50",
  "DQNFLEET_NUM_ENVS": "4",
  "DQNFLEET_LOG_EVERY_S": "2",
  # Often enough for test_docker_compose_kill_then_up_continues_from_the_volumes.
  "DQNFLEET_CHECKPOINT_EVERY": "200",
  "DQNFLEET_CHECKPOINT_EVERY_S": "5",
}


def run(*args, timeout=300, check=True, env=None) -> subprocess.CompletedProcess:
  result = subprocess.run(
    list(args),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **SETTINGS, **(env or {})},
  )
  if check and result.returncode != 0:
    raise AssertionError(
      f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
      f"{result.stderr[-3000:]}"
    )
  return result


def compose(*args, timeout=300, check=True):
  return run("docker", "compose", "-p", PROJECT, *FILES, *args, timeout=timeout, check=check)


def docker_problem() -> str | None:
  if not shutil.which("docker"):
    return "no docker client"
  if run("docker", "info", check=False, timeout=60).returncode != 0:
    return "no Docker engine answers (run ../shared/tools/docker-engine)"
  if run("docker", "compose", "version", check=False, timeout=60).returncode != 0:
    return "no `docker compose` (run ../shared/tools/docker-engine)"
  if run("docker", "image", "inspect", "python:3.11-slim-bookworm", check=False).returncode != 0:
    return "no python:3.11-slim-bookworm base image (run ../shared/tools/base-image)"
  return None


@pytest.fixture(scope="module")
def fleet():
  problem = docker_problem()
  if problem:
    if os.environ.get("CI"):
      pytest.fail(f"Docker is required in CI: {problem}")
    pytest.skip(problem)
  started = time.monotonic()
  compose("build", timeout=3600)
  print(f"image build took {time.monotonic() - started:.0f}s")
  try:
    compose("--profile", "tensorboard", "up", "-d", "--scale", "collector=2", timeout=600)
    yield
  finally:
    logs = compose("logs", "--no-color", "--tail=30", check=False).stdout
    print(logs[-6000:])
    compose("--profile", "tensorboard", "down", "-v", "--remove-orphans", timeout=300)


def exec_json(service_or_id: str, *args, container=False):
  command = (
    ["docker", "exec", service_or_id]
    if container
    else ["docker", "compose", "-p", PROJECT, *FILES, "exec", "-T", service_or_id]
  )
  return json.loads(run(*command, "dqnfleet", "status", "--json", *args, timeout=120).stdout)


def collectors() -> list[str]:
  return compose("ps", "-q", "collector").stdout.split()


def test_compose_file_is_valid_for_this_compose():
  if docker_problem() and not os.environ.get("CI"):
    pytest.skip(docker_problem())
  for files in (
    ["-f", "docker-compose.yml"],
    ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"],
    [*FILES, "-f", "docker-compose.gpu.yml"],
    ["-f", "docker-compose.yml", "-f", "docker-compose.input-workers.yml"],
  ):
    run("docker", "compose", "-p", PROJECT, *files, "config", "-q")


@pytest.mark.parametrize(
  "command", [["docker", "compose"], ["docker-compose"]], ids=["docker-compose-plugin", "v1"]
)
def test_the_shards_override_adds_a_shard_every_client_and_prometheus_know(command):
  """docker-compose.shards.yml, merged as this compose merges it: replay-1 is replay
  on a volume of its own; the trainer and collectors list both shards, and wait
  for both; Prometheus scrapes both as job `replay`."""
  if not shutil.which(command[0]) or (
    subprocess.run([*command, "version"], capture_output=True, timeout=60).returncode != 0
  ):
    if os.environ.get("CI"):
      pytest.fail(f"{' '.join(command)} is required in CI (../shared/tools/docker-engine)")
    pytest.skip(f"no {' '.join(command)}")
  services = compose_config(command, "-p", "dqnfleetshards", *FILES, "--profile", "monitoring")[
    "services"
  ]
  shards = [name for name, s in services.items() if (s.get("command") or [])[:1] == ["replay"]]
  assert sorted(shards) == sorted(SHARDS)

  def volumes(service: dict) -> dict[str, str]:
    """target -> source of a service's mounts (Compose v2's long form or v1's short one)."""
    out = {}
    for v in service.get("volumes", []):
      source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
      out[target] = source
    return out

  first, second = (services[name] for name in SHARDS)
  for key in ("command", "environment", "healthcheck", "image"):
    assert first[key] == second[key], key
  data = flag_values(first["command"])["--checkpoint-dir"]
  assert volumes(first)[data] != volumes(second)[data]  # each shard restores its own table
  port = flag_values(first["command"])["--port"]
  for role in ("trainer", "collector"):
    addresses = services[role]["environment"]["DQNFLEET_REPLAY_ADDRESSES"]
    assert addresses.split(",") == [f"{name}:{port}" for name in SHARDS], role
    assert {n: d["condition"] for n, d in services[role]["depends_on"].items()} == {
      name: "service_healthy" for name in SHARDS
    }, role

  # Prometheus: prometheus.yml's own jobs and those of the files it loads that
  # the override mounts; every shard is a target of job `replay`, once.
  mounts = volumes(services["prometheus"])
  config = yaml.safe_load(pathlib.Path(mounts["/etc/prometheus/prometheus.yml"]).read_text())
  jobs = list(config["scrape_configs"])
  for pattern in config["scrape_config_files"]:
    for target, source in mounts.items():
      if fnmatch.fnmatch(target, pattern):
        jobs += yaml.safe_load(pathlib.Path(source).read_text())["scrape_configs"]
  assert len({job["job_name"] for job in jobs}) == len(jobs)  # Prometheus refuses duplicates
  metrics = flag_values(first["command"])["--metrics-port"]
  replay_targets = [
    target
    for job in jobs
    for static in job.get("static_configs", [])
    if static.get("labels", {}).get("job", job["job_name"]) == "replay"
    for target in static["targets"]
  ]
  assert sorted(replay_targets) == sorted(f"{name}:{metrics}" for name in SHARDS)
  # Without the override the pattern matches no mounted file: prometheus.yml alone.
  base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
  assert not [v for v in base["prometheus"]["volumes"] if "/scrape.d/" in v]
  assert compose_default(base["trainer"]["environment"]["DQNFLEET_REPLAY_ADDRESSES"]) == (
    f"replay:{port}"
  )


@pytest.mark.parametrize(
  "command", [["docker", "compose"], ["docker-compose"]], ids=["docker-compose-plugin", "v1"]
)
def test_the_input_workers_override_points_workers_at_the_trainers_dispatcher(command):
  """docker-compose.input-workers.yml, merged as this compose merges it: the trainer opens
  the dispatcher port the input workers register with, on the compose network only."""
  if not shutil.which(command[0]) or (
    subprocess.run([*command, "version"], capture_output=True, timeout=60).returncode != 0
  ):
    if os.environ.get("CI"):
      pytest.fail(f"{' '.join(command)} is required in CI (../shared/tools/docker-engine)")
    pytest.skip(f"no {' '.join(command)}")
  files = ("-f", "docker-compose.yml", "-f", "docker-compose.input-workers.yml")
  services = compose_config(command, "-p", "dqnfleetinput", *files)["services"]
  worker, trainer = services["input-worker"], services["trainer"]
  port = trainer["environment"]["DQNFLEET_INPUT_DISPATCHER_PORT"]
  args = flag_values(worker["command"])
  assert worker["command"][0] == "input-worker"
  assert args["--dispatcher-address"] == f"trainer:{port}"
  assert worker["healthcheck"]["test"][-1] == f"localhost:{args['--status-port']}"
  assert worker["image"] == trainer["image"]
  # The trainer keeps all it had (volumes, settings): the override only adds the port.
  assert trainer["volumes"] and "DQNFLEET_BATCH_SIZE" in trainer["environment"]
  assert not worker.get("ports") and not trainer.get("ports")  # nothing on the host
  base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
  assert "DQNFLEET_INPUT_DISPATCHER_PORT" not in base["trainer"]["environment"]


def shard_statuses() -> list[dict]:
  return exec_json("trainer", *(f"{name}:8001" for name in SHARDS))


@pytest.mark.slow
def test_the_fleet_trains_and_collectors_act_with_published_policies(fleet):
  def trainer_steps():
    replay, trainer = exec_json("trainer", "replay:8001", "localhost:8010")
    return trainer["counters"]["train_steps"] > 0 and replay["replay_size"] >= MIN_SIZE and trainer

  first = wait_until(trainer_steps, 600, "the trainer to train", interval=5)
  # Versions are train steps, published every 50 (DQNFLEET_PUBLISH_EVERY).
  wait_until(
    lambda: (
      (t := trainer_steps())
      and t["counters"]["train_steps"] > first["counters"]["train_steps"]
      and t["policy_version"] > 0
    ),
    300,
    "train steps to advance and a version after v0 to be published",
    interval=5,
  )
  ids = collectors()
  assert len(ids) == 2
  for container in ids:
    status = wait_until(
      lambda: (
        (s := exec_json(container, "localhost:8020", container=True)[0])["policy_version"] > 0 and s
      ),
      300,
      "a collector to act with a policy",
      interval=5,
    )
    assert status["role"] == "collector" and status["counters"]["env_steps"] > 0
  seeds = {exec_json(c, "localhost:8020", container=True)[0]["counters"]["seed"] for c in ids}
  assert len(seeds) == 2  # each replica its own id and seed, without edits


@pytest.mark.slow
def test_the_collectors_fill_every_replay_shard(fleet):
  """Each shard is a server of its own, and each fills past its min size: the
  collectors spread their writes over both."""

  def filled():
    statuses = shard_statuses()
    return all(s["replay_size"] >= MIN_SIZE for s in statuses) and statuses

  statuses = wait_until(filled, 600, f"{MIN_SIZE} items in each of {', '.join(SHARDS)}", interval=5)
  assert [s["role"] for s in statuses] == ["replay"] * len(SHARDS)
  assert all(s["counters"]["items_inserted"] >= MIN_SIZE for s in statuses), statuses


@pytest.mark.slow
def test_a_third_collector_reaches_the_replay_table(fleet):
  before = set(collectors())
  compose("up", "-d", "--no-recreate", "--scale", "collector=3", timeout=600)
  new = set(collectors()) - before
  assert len(new) == 1
  (container,) = new
  source = wait_until(
    lambda: exec_json(container, "localhost:8020", container=True)[0]["counters"].get("source_id"),
    300,
    "the new collector to start",
    interval=5,
  )
  # Whichever shards its environments write to.
  probe = (
    "import reverb; from dqnfleet.core.rl import specs; print(sorted({"
    "int(specs.unpack_step(s.data['step'])['collector']) for shard in "
    f"{[f'{name}:8000' for name in SHARDS]!r} for s in reverb.Client(shard).sample("
    "'transitions', 2000, emit_timesteps=False, unpack_as_table_signature=True)}))"
  )

  def sampled_sources():
    out = compose("exec", "-T", "trainer", "python", "-c", probe, timeout=120).stdout
    return int(source) in json.loads(out.strip().splitlines()[-1])

  wait_until(sampled_sources, 300, "items of the third collector in replay", interval=5)


@pytest.mark.slow
def test_tensorboard_shows_collector_returns_without_a_shared_filesystem(fleet):
  """Collectors mount no volume: their scalars reach TensorBoard through the trainer."""
  probe = (
    "import glob, tensorflow as tf; print(sorted({v.tag for f in glob.glob("
    "'/data/trainer/tensorboard/collectors/events.out.tfevents.*') for e in "
    "tf.compat.v1.train.summary_iterator(f) for v in e.summary.value}))"
  )

  def tags():
    out = compose(
      "--profile", "tensorboard", "exec", "-T", "tensorboard", "python", "-c", probe, timeout=120
    ).stdout
    return json.loads(out.strip().splitlines()[-1].replace("'", '"'))

  found = wait_until(
    lambda: "collector/episode_return" in (t := tags()) and t,
    300,
    "collector episode returns in the tensorboard container's logdir",
    interval=10,
  )
  assert "collector/episode_length" in found


@pytest.mark.slow
def test_tensorboard_is_published_on_loopback_only(fleet):
  """Nothing in front of TensorBoard asks who is looking: it stays on this machine."""
  published = compose("--profile", "tensorboard", "port", "tensorboard", "6006").stdout.split()
  assert published and all(p.startswith("127.0.0.1:") for p in published), published


@pytest.mark.slow
def test_prometheus_finds_every_collector_on_the_compose_network(fleet):
  """What deploy/monitoring/prometheus.yml relies on: the service name resolves to each
  collector, and each serves /metrics on its default port."""
  probe = (
    "import socket, urllib.request; ips = sorted({a[4][0] for a in socket.getaddrinfo("
    "'collector', 8021, type=socket.SOCK_STREAM)}); print(ips); [print(ip, 'env_steps', "
    "[l for l in urllib.request.urlopen(f'http://{ip}:8021/metrics', timeout=10).read()"
    ".decode().splitlines() if l.startswith('dqnfleet_collector_env_steps_total')])"
    " for ip in ips]"
  )
  out = compose("exec", "-T", "trainer", "python", "-c", probe, timeout=120).stdout
  lines = out.strip().splitlines()
  ips = json.loads(lines[0].replace("'", '"'))
  assert len(ips) == len(collectors()) >= 2, out
  for line in lines[1:]:
    assert "dqnfleet_collector_env_steps_total" in line, out


@pytest.mark.slow
def test_services_run_as_a_non_root_user(fleet):
  for service in (*SHARDS, "trainer", "collector"):
    uid = compose("exec", "-T", service, "id", "-u").stdout.strip()
    assert uid == "10001", f"{service} runs as uid {uid}"


def compose_log(service: str, since: str = "") -> str:
  return compose("logs", "--no-color", *(["--since", since] if since else []), service).stdout


def numbers(pattern: str, text: str) -> list[int]:
  return [int(n) for n in re.findall(pattern, text)]


@pytest.mark.slow
def test_docker_compose_kill_then_up_continues_from_the_volumes(fleet):
  """A power cut of the compose fleet: `docker compose kill` SIGKILLs every container at
  once, and `up` starts them again on the same volumes. The trainer resumes from its newest
  checkpoint (not from step 0), each replay shard restores its newest checkpoint, and no
  version announced before the cut goes back."""
  trainer_steps = lambda: exec_json("trainer", "localhost:8010")[0]["counters"]["train_steps"]
  wait_until(lambda: trainer_steps() >= 600, 600, "three trainer checkpoints", interval=5)
  wait_until(
    lambda: all(numbers(r"checkpointed (\d+) items to", compose_log(s)) for s in SHARDS),
    120,
    "a checkpoint of each replay shard",
    interval=5,
  )
  listed = compose("exec", "-T", "trainer", "ls", "/data/trainer/checkpoints").stdout
  checkpointed = max(numbers(r"ckpt-(\d+)\.index", listed))
  held = {s: numbers(r"checkpointed (\d+) items to", compose_log(s))[-1] for s in SHARDS}
  announced = exec_json("trainer", "localhost:8010")[0]["policy_version"]
  compose("--profile", "tensorboard", "kill")
  cut = run("date", "-u", "+%Y-%m-%dT%H:%M:%SZ").stdout.strip()
  assert not compose("ps", "-q", "--status", "running").stdout.split()

  compose("--profile", "tensorboard", "up", "-d", "--scale", "collector=2", timeout=600)
  resumed = wait_until(
    lambda: numbers(r"resumed from \S*ckpt-\d+ at train step (\d+)", compose_log("trainer", cut)),
    300,
    "the trainer to resume",
    interval=5,
  )[0]
  assert resumed >= checkpointed > 0, (resumed, checkpointed)
  for shard in SHARDS:
    restored = wait_until(
      lambda: numbers(r"(\d+) items restored from", compose_log(shard, cut)),
      300,
      f"{shard} to restore its checkpoint",
      interval=5,
    )[0]
    assert restored >= held[shard] > 0, (shard, restored, held[shard])
  # Until training passes it, the restarted trainer serves what it announced before.
  status = wait_until(
    lambda: (t := exec_json("trainer", "localhost:8010")[0])["policy_version"] >= 0 and t,
    300,
    "the trainer to announce",
    interval=5,
  )
  assert status["policy_version"] >= announced, (status["policy_version"], announced)
  wait_until(lambda: trainer_steps() > resumed, 300, "training again", interval=5)


@pytest.mark.slow
def test_down_removes_everything(fleet):
  """Last in this module: `down -v` leaves no container, volume or network behind."""
  # Naming the profile, as docker-compose.yml says: with more than one file,
  # Compose v2 (2.26) leaves the containers of profiles not named.
  compose("--profile", "tensorboard", "down", "-v", "--remove-orphans", timeout=300)
  label = f"label=com.docker.compose.project={PROJECT}"
  for kind in ("container", "volume", "network"):
    extra = ["-a"] if kind == "container" else []
    listing = run("docker", kind, "ls", "-q", "--filter", label, *extra)
    assert listing.stdout.strip() == "", f"{kind}s left behind: {listing.stdout}"
