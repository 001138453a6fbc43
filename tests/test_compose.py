"""`docker compose up` runs the fleet; collectors scale with --scale.

Needs a Docker engine and the python:3.11-slim-bookworm base image (.ci/run
provides both with ../shared/tools). Outside CI the test is skipped without
them; in CI (CI=true) it fails instead, so a broken engine is never silent.
"""

import json
import os
import shutil
import subprocess
import time

import pytest

from support import ROOT, wait_until

PROJECT = f"dqnfleettest{os.getpid()}"
SETTINGS = {
  "DQNFLEET_ENV_ID": "CartPole-v1",
  "DQNFLEET_MIN_SIZE": "300",
  "DQNFLEET_MAX_SIZE": "20000",
  "DQNFLEET_PUBLISH_EVERY": "50",
  "DQNFLEET_NUM_ENVS": "4",
  "DQNFLEET_LOG_EVERY_S": "2",
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
  return run("docker", "compose", "-p", PROJECT, *args, timeout=timeout, check=check)


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
    else ["docker", "compose", "-p", PROJECT, "exec", "-T", service_or_id]
  )
  return json.loads(run(*command, "dqnfleet", "status", "--json", *args, timeout=120).stdout)


def collectors() -> list[str]:
  return compose("ps", "-q", "collector").stdout.split()


def test_compose_file_is_valid_for_this_compose():
  if docker_problem() and not os.environ.get("CI"):
    pytest.skip(docker_problem())
  compose("config", "-q")
  compose("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config", "-q")


@pytest.mark.slow
def test_the_fleet_trains_and_collectors_act_with_published_policies(fleet):
  def trainer_steps():
    replay, trainer = exec_json("trainer", "replay:8001", "localhost:8010")
    return trainer["counters"]["train_steps"] > 0 and replay["replay_size"] >= 300 and trainer

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
  probe = (
    "import reverb; from dqnfleet.core.rl import specs; c = reverb.Client('replay:8000'); "
    "print(sorted({int(specs.unpack_step(s.data['step'])['collector']) for s in "
    "c.sample('transitions', 2000, emit_timesteps=False, unpack_as_table_signature=True)}))"
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
  for service in ("replay", "trainer", "collector"):
    uid = compose("exec", "-T", service, "id", "-u").stdout.strip()
    assert uid == "10001", f"{service} runs as uid {uid}"


@pytest.mark.slow
def test_down_removes_everything(fleet):
  """Last in this module: `down -v` leaves no container, volume or network behind."""
  compose("down", "-v", "--remove-orphans", timeout=300)
  label = f"label=com.docker.compose.project={PROJECT}"
  for kind in ("container", "volume", "network"):
    extra = ["-a"] if kind == "container" else []
    listing = run("docker", kind, "ls", "-q", "--filter", label, *extra)
    assert listing.stdout.strip() == "", f"{kind}s left behind: {listing.stdout}"
