"""docker-compose.yml, the Kubernetes manifests (deploy/k8s) and the settings
agree: each role runs the same command with the same variables, every variable
is a real setting of the role with a valid value, and the metrics port a
service opens from its args and variables is where Prometheus looks.

The manifests are rendered with `kubectl kustomize` (the `rendered` fixture,
conftest.py); outside CI the tests that need it are skipped without it, in CI
(CI=true) they fail.
"""

import dataclasses
import os
import re

import pytest

from dqnfleet.cli.commands import COMMANDS
from dqnfleet.cli.main import build_configs, build_parser
from dqnfleet.core.settings import config as config_module
from dqnfleet.core.settings.flags import ENV_PREFIX, env_name
from support import (
  COMPOSED,
  DEFAULT_METRICS_PORTS,
  PROBES,
  ROLES,
  VARIANTS,
  by_kind,
  compose_default,
  compose_file,
  configmap_data,
  container,
  flag_values,
  opened_ports,
  pod_env,
  tensorboard_logdir,
  workload,
)

# The services that must agree on the environment (EnvConfig): the replay item
# layout depends on it. The evaluator learns it from the trainer's policy API.
TRAINING_ROLES = ("replay", "trainer", "collector")


def repository(image: str) -> str:
  return re.sub(r"(@sha256:[0-9a-f]+|:[\w.-]+)$", "", image)


def role_settings(role: str) -> set[str]:
  return {env_name(f) for group in COMMANDS[role].groups for f in dataclasses.fields(group)}


def pod_configs(objects: list[dict], role: str, monkeypatch) -> list:
  """The settings the role's container reads from its args and its pod's
  environment alone (no DQNFLEET_* variable of this process), as the service
  builds them at start; a ConfigError here is a service that would not start."""
  c = container(objects, role)
  for name in list(os.environ):
    if name.startswith(ENV_PREFIX):
      monkeypatch.delenv(name)
  for name, value in pod_env(objects, c, f"{role}-0").items():
    monkeypatch.setenv(name, value)
  return build_configs(COMMANDS[role], build_parser().parse_args(c["args"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_role_runs_what_compose_runs(rendered, variant):
  objects, _ = rendered[variant]
  compose, compose_gpu = compose_file(), compose_file("docker-compose.gpu.yml")
  for role in ROLES:
    c, service = container(objects, role), compose["services"][role]
    # No `command`: the image's entrypoint (`dqnfleet`) runs, with compose's command as args.
    assert "command" not in c and c["args"] == service["command"], role
    image = compose_default(
      (compose_gpu["services"] if variant == "gpu" and role == "trainer" else compose["services"])[
        role
      ]["image"]
    )
    assert c["image"] == image, role
    assert repository(c["image"]) == repository(compose_default(compose["x-image"]["image"]))
    ports = opened_ports(c["args"])
    assert {p["containerPort"] for p in c["ports"]} == ports, role
    # Probes ask the port compose's health check asks, which the service opens
    # (replay's Reverb port has no health service, its status port does).
    health_port = int(service["healthcheck"]["test"][-1].rpartition(":")[2])
    assert health_port in ports
    # Compose waits for readiness; Kubernetes routes by readiness and restarts
    # by liveness (the empty service name), so a service waiting for a peer is
    # never killed for it.
    assert "--ready" in service["healthcheck"]["test"], role
    for probe in PROBES:
      expected = (
        {"port": health_port, "service": "readiness"}
        if probe == "readinessProbe"
        else {"port": health_port}
      )
      assert c[probe]["grpc"] == expected, f"{role} {probe}"
      assert c[probe].get("timeoutSeconds", 1) < c[probe].get("periodSeconds", 10)
    spec = workload(objects, role)["spec"]
    assert spec["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= 30


def test_compose_tensorboard_reads_the_trainers_volume_where_it_writes_all_summaries():
  """Collectors and the evaluator send their summaries to the trainer, which
  writes everyone's into <run dir>/tensorboard: the profile reads that, read-only."""
  services = compose_file()["services"]
  tensorboard, trainer = services["tensorboard"], services["trainer"]
  assert tensorboard["profiles"] == ["tensorboard"]
  logdir = tensorboard_logdir(tensorboard["entrypoint"] + tensorboard["command"])
  assert logdir == flag_values(trainer["command"])["--run-dir"] + "/tensorboard"

  def volume(service: dict, path: str) -> tuple[str, str]:
    """The named volume holding `path` in a service, and the mount's mode ("rw" or "ro")."""
    mounts = [v.split(":") for v in service.get("volumes", [])]
    (name, _, *mode) = max(
      (m for m in mounts if path == m[1] or path.startswith(m[1] + "/")), key=lambda m: len(m[1])
    )
    return name, (mode or ["rw"])[0]

  assert volume(tensorboard, logdir) == (volume(trainer, logdir)[0], "ro")
  assert volume(trainer, logdir) == ("trainer-data", "rw")
  # Nothing else writes there: the evaluator keeps only its results, on its
  # own volume, and writes no summaries of its own; collectors mount nothing.
  evaluator = services["evaluator"]
  assert "--summary-dir" not in flag_values(evaluator["command"])
  out_dir = flag_values(evaluator["command"])["--out-dir"]
  assert evaluator["volumes"] == [f"evaluator-data:{out_dir}"]
  assert "volumes" not in services["collector"]
  assert "evaluator-data" in compose_file()["volumes"]


def test_compose_clients_reach_every_replay_service_by_default():
  """Without docker-compose.shards.yml one replay service runs, and the trainer's and
  collectors' default address list is exactly it (tests/test_compose.py checks the
  override's two). An address flag would win over the variable the override sets."""
  services = compose_file()["services"]
  shards = [name for name, s in services.items() if (s.get("command") or [])[:1] == ["replay"]]
  assert shards == ["replay"]
  port = flag_values(services["replay"]["command"])["--port"]
  for role in ("trainer", "collector"):
    assert "--replay-addresses" not in flag_values(services[role]["command"]), role
    addresses = compose_default(services[role]["environment"]["DQNFLEET_REPLAY_ADDRESSES"])
    assert addresses.split(",") == [f"{name}:{port}" for name in shards], role


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_are_compose_variables_and_real_settings(rendered, variant, monkeypatch):
  objects, _ = rendered[variant]
  compose = compose_file()
  all_settings = {
    env_name(f)
    for cls in vars(config_module).values()
    if dataclasses.is_dataclass(cls)
    for f in dataclasses.fields(cls)
  }
  for role in ROLES:
    c = container(objects, role)
    # Generated with a content hash, so a changed setting rolls the pods.
    for source in c["envFrom"]:
      assert re.fullmatch(r"dqnfleet-[a-z-]+-[a-z0-9]{10}", source["configMapRef"]["name"])
    keys = set(configmap_data(objects, c))
    # Exactly the variables compose passes to this role: the same names, and
    # every setting compose exposes can be set here too.
    assert keys == set(compose["services"][role]["environment"]), role
    names = keys | {v["name"] for v in c.get("env", []) if v["name"].startswith(ENV_PREFIX)}
    assert names <= all_settings and names <= role_settings(role), names - role_settings(role)
    # A variable for a setting the args also set would be silently ignored.
    flags = {"--" + name[len(ENV_PREFIX) :].lower().replace("_", "-") for name in names}
    assert not flags & set(flag_values(c["args"])), role
    # The values are valid: the service would start with them, not exit with a ConfigError.
    pod_configs(objects, role, monkeypatch)
  # Settings that must agree (env id, n-step, ...) come from one ConfigMap for
  # all the services that read them, so they cannot drift apart.
  env_settings = {env_name(f) for f in dataclasses.fields(config_module.EnvConfig)}
  configmaps = by_kind(objects, "ConfigMap")
  for name in env_settings:
    sources = set()
    for role in TRAINING_ROLES:
      for source in container(objects, role)["envFrom"]:
        if name in configmaps[source["configMapRef"]["name"]].get("data", {}):
          sources.add(source["configMapRef"]["name"])
    assert len(sources) == 1 and next(iter(sources)).startswith("dqnfleet-shared-"), (name, sources)
  assert "DQNFLEET_N_STEP" in env_settings
  # The evaluator builds the environment the trainer's policy API describes:
  # the shared ConfigMap is not its (its DQNFLEET_EVAL_STICKY_ACTIONS is the
  # evaluation protocol's, in its own ConfigMap).
  assert not [
    s
    for s in container(objects, "evaluator")["envFrom"]
    if s["configMapRef"]["name"].startswith("dqnfleet-shared-")
  ]


@pytest.mark.parametrize("variant", [*VARIANTS, *COMPOSED])
def test_every_pod_serves_metrics_where_prometheus_looks(rendered, variant, monkeypatch):
  """The port a service opens, as it reads its args and DQNFLEET_* variables, is
  its pod's `metrics` port and the one its prometheus.io/* annotations name."""
  objects, _ = rendered[variant]
  for role in ROLES:
    template = workload(objects, role)["spec"]["template"]
    c = container(objects, role)
    configs = pod_configs(objects, role, monkeypatch)
    (opened,) = [group.metrics_port for group in configs.values() if hasattr(group, "metrics_port")]
    # The defaults, which compose's prometheus.yml scrapes too (tests/test_monitoring.py).
    assert opened == DEFAULT_METRICS_PORTS[role], role
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [opened], role
    annotations = {
      k: v
      for k, v in template["metadata"].get("annotations", {}).items()
      if k.startswith("prometheus.io/")
    }
    assert annotations == {
      "prometheus.io/scrape": "true",
      "prometheus.io/port": str(opened),
      "prometheus.io/path": "/metrics",
    }, role
