"""Plain helpers the tests share: real services as real processes on loopback
ports, their settings as flags, their /metrics, the compose file and the
rendered Kubernetes manifests. Fixtures are in conftest.py.

Imported as `from support import ...`: pytest puts tests/ (no __init__.py) on
sys.path for the test modules and conftest.py.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dqnfleet.cli.up import free_port  # noqa: F401  (re-exported for the tests)
from dqnfleet.core.settings import config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # for the services and this process
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Services in tests serve metrics on a free port unless a test names one:
# several of one role run at once on this host.
SERVICE_ENV = {"DQNFLEET_METRICS_PORT": "0"}
ROLES = ("replay", "trainer", "collector", "evaluator")
# Where each service serves /metrics unless told otherwise; compose's
# prometheus.yml and the Kubernetes annotations and monitors expect these.
DEFAULT_METRICS_PORTS = {
  "replay": config.DEFAULT_REPLAY_METRICS_PORT,
  "trainer": config.DEFAULT_TRAINER_METRICS_PORT,
  "collector": config.DEFAULT_COLLECTOR_METRICS_PORT,
  "evaluator": config.DEFAULT_EVALUATOR_METRICS_PORT,
}
# What the services export (issue #10), the one list the Grafana dashboard may
# use. Histograms are listed by their name; Prometheus stores _bucket, _sum, _count.
METRICS = {
  "every service": {"dqnfleet_build_info"},
  "collector": {
    "dqnfleet_collector_env_steps_total",
    "dqnfleet_collector_episodes_total",
    "dqnfleet_collector_items_total",
    "dqnfleet_collector_episode_return",
    "dqnfleet_collector_policy_version",
    "dqnfleet_collector_epsilon",
    "dqnfleet_collector_replay_wait_seconds_total",
    "dqnfleet_collector_episode_epsilon",
    "dqnfleet_collector_initial_priority",
    "dqnfleet_collector_replay_shards_up",
  },
  "replay": {
    "dqnfleet_replay_table_size",
    "dqnfleet_replay_table_max_size",
    "dqnfleet_replay_inserts_total",
    "dqnfleet_replay_samples_total",
    "dqnfleet_replay_insert_blocked_seconds_total",
    "dqnfleet_replay_sample_blocked_seconds_total",
    "dqnfleet_replay_checkpoints_total",
  },
  "trainer": {
    "dqnfleet_trainer_train_steps_total",
    "dqnfleet_trainer_loss",
    "dqnfleet_trainer_mean_q",
    "dqnfleet_trainer_policy_lag_steps",
    "dqnfleet_trainer_policy_version",
    "dqnfleet_trainer_publishes_total",
    "dqnfleet_trainer_policy_bytes",
    "dqnfleet_trainer_policy_watchers",
    "dqnfleet_trainer_policy_fetches",
    "dqnfleet_trainer_bad_items_dropped_total",
    "dqnfleet_trainer_unreadable_items_skipped_total",
    "dqnfleet_trainer_replay_shards",
    "dqnfleet_trainer_replay_shards_up",
  },
  "evaluator": {
    "dqnfleet_evaluator_evaluations_total",
    "dqnfleet_evaluator_return_mean",
    "dqnfleet_evaluator_return_median",
    "dqnfleet_evaluator_return_max",
    "dqnfleet_evaluator_episode_length_mean",
    "dqnfleet_evaluator_policy_version",
  },
  # prometheus_client's process collector, in every service (Linux).
  "process": {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
  },
}


def required(what: str):
  """Skips the test without `what` outside CI; in CI (CI=true) fails instead."""
  if os.environ.get("CI"):
    pytest.fail(f"{what} is required in CI")
  pytest.skip(f"no {what}")


# --- services as processes -----------------------------------------------------------------------


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
  """Polls `predicate` until it returns a truthy value; fails the test after `timeout`."""
  deadline = time.monotonic() + timeout
  last_error = None
  while time.monotonic() < deadline:
    try:
      value = predicate()
      if value:
        return value
    except Exception as e:  # the service may still be starting
      last_error = e
    time.sleep(interval)
  pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def setting_flags(**settings) -> list[str]:
  """Settings by their field names as flags: port=8000 -> `--port=8000`,
  double_dqn=True -> `--double-dqn`, False -> `--no-double-dqn`, a tuple -> a comma-separated
  list; None leaves one out."""
  out = []
  for name, value in settings.items():
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
      out.append(flag if value else "--no-" + flag[2:])
    elif isinstance(value, (tuple, list)):
      out.append(f"{flag}={','.join(map(str, value))}")
    elif value is not None:
      out.append(f"{flag}={value}")
  return out


def service_args(role: str, **settings) -> list[str]:
  """The arguments of `dqnfleet <role>` with these settings (see setting_flags)."""
  return [role, *setting_flags(**settings)]


def replay_table(env_specs, max_size: int = 1000, min_size: int = 1, **options):
  """A table of the layout of `env_specs`, uniform and FIFO unless `options` say otherwise,
  for a Reverb server in the test process."""
  import reverb

  from dqnfleet.core.rl import specs

  return reverb.Table(
    specs.TABLE,
    options.pop("sampler", reverb.selectors.Uniform()),
    reverb.selectors.Fifo(),
    max_size=max_size,
    rate_limiter=options.pop("rate_limiter", reverb.rate_limiters.MinSize(min_size)),
    signature=specs.table_signature(env_specs),
    **options,
  )


def start_up(**settings) -> subprocess.Popen:
  """`dqnfleet up` with these settings (see setting_flags); its progress lines on `.stdout`."""
  return subprocess.Popen(
    [sys.executable, "-m", "dqnfleet", *service_args("up", **settings)],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def start_trainer(
  services, replay_port: int, trainer_port: int, run_dir, env_id="CartPole-v1", **settings
):
  """A trainer (CartPole unless `env_id` says otherwise) on replay at `replay_port`,
  started with the `services` fixture."""
  return services(
    "trainer",
    *service_args(
      "trainer",
      env_id=env_id,
      replay_addresses=(f"localhost:{replay_port}",),
      port=trainer_port,
      run_dir=run_dir,
      **settings,
    ),
  )


def cartpole_collector_args(replay_port: int, trainer_port: int, status_port: int) -> list[str]:
  """`dqnfleet collector` of 2 CartPole environments writing to replay at `replay_port`."""
  return service_args(
    "collector",
    env_id="CartPole-v1",
    replay_addresses=(f"localhost:{replay_port}",),
    trainer_address=f"localhost:{trainer_port}",
    status_port=status_port,
    num_envs=2,
  )


def start_trainer_without_data(
  services, run_dir: pathlib.Path, env_id: str = "CartPole-v1"
) -> tuple["Service", int]:
  """A replay no collector writes to (--min-size 5000) and a trainer on it (CartPole unless
  `env_id` says otherwise), started with the `services` fixture: the trainer publishes its
  untrained network (v0), then waits for data. Returns the trainer and its port."""
  replay_port, trainer_port = free_port(), free_port()
  services(
    "replay",
    *service_args(
      "replay", env_id=env_id, port=replay_port, status_port=free_port(), min_size=5000
    ),
  )
  return start_trainer(services, replay_port, trainer_port, run_dir, env_id), trainer_port


class Service:
  """One `dqnfleet <role>` process with its log file."""

  def __init__(self, name: str, args: list[str], log_dir: pathlib.Path, env: dict | None = None):
    self.name = name
    self.log_path = log_dir / f"{name}.log"
    self._log = open(self.log_path, "ab")
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "dqnfleet", *args],
      stdout=self._log,
      stderr=subprocess.STDOUT,
      env={**SERVICE_ENV, **os.environ, **(env or {})},
    )

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def stop(self, timeout: float = 30) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(
          f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()[-3000:]}"
        ) from None
    self._log.close()
    return self.proc.returncode


def dqnfleet(
  *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
  """Runs one `dqnfleet` command to completion."""
  return subprocess.run(
    [sys.executable, "-m", "dqnfleet", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**SERVICE_ENV, **os.environ, **(env or {})},
  )


# --- /metrics ------------------------------------------------------------------------------------


def metric_families(port: int, path: str = "/metrics") -> list:
  """One scrape of http://localhost:<port><path>, parsed from Prometheus' text format."""
  text = urllib.request.urlopen(f"http://localhost:{port}{path}", timeout=10).read().decode()
  return list(text_string_to_metric_families(text))


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
  """One scrape: {sample name with its labels, `name{k=v,...}`: value}."""
  samples = {}
  for family in metric_families(port, path):
    for sample in family.samples:
      labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
      samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
  return samples


# --- compose and flag lists ----------------------------------------------------------------------


def compose_file(name: str = "docker-compose.yml") -> dict:
  return yaml.safe_load((ROOT / name).read_text())  # resolves the x-* anchors and `<<:` merges


def compose_config(command: list[str], *args: str) -> dict:
  """What `command` (a Compose of either flavour) resolves with `args` (project, files,
  profiles) and `config`, without pulling anything: the DQNFLEET_ variables of this
  environment left out, so that the files' own defaults are what is read."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("DQNFLEET_")}
  rendered = subprocess.run(
    [*command, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
  )
  assert rendered.returncode == 0, rendered.stderr
  return yaml.safe_load(rendered.stdout)


def compose_default(value: str) -> str:
  """`${VAR:-default}` -> default, as compose resolves it with VAR unset."""
  return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def flag_values(args: list[str]) -> dict[str, str]:
  """The --name=value flags of a service's args (after the role), as compose and
  Kubernetes write them."""
  values = {}
  for arg in args[1:]:
    flag, sep, value = arg.partition("=")
    assert arg.startswith("--") and sep, f"{arg!r}: write flags as --name=value"
    values[flag] = value
  return values


def opened_ports(args: list[str]) -> set[int]:
  """The ports a service listens on: the values of its --port / --*-port flags."""
  return {int(v) for flag, v in flag_values(args).items() if flag.endswith("port")}


def tensorboard_logdir(argv: list[str]) -> str:
  """The --logdir of a `tensorboard ...` command line."""
  assert argv[0] == "tensorboard", argv
  (logdir,) = [a.partition("=")[2] for a in argv[1:] if a.startswith("--logdir=")]
  return logdir


# --- the Kubernetes manifests (deploy/k8s) --------------------------------------------------------


K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
COMPONENTS = K8S / "components"
# Rendered on top of a variant in a throwaway overlay: name -> (variant, components).
# "monitoring" is both monitoring components and two replay shards on the gpu
# overlay, which has none of them (the dev overlay includes the tensorboard and
# replay-shards components itself).
COMPOSED = {
  "hpa": ("dev", ["collector-hpa"]),
  "monitoring": ("gpu", ["tensorboard", "service-monitor", "replay-shards"]),
  "input-workers": ("dev", ["input-workers"]),
}
# Replay shards (the replay StatefulSet's replicas) of each variant and of COMPOSED.
REPLAY_SHARDS = {"base": 1, "gpu": 1, "dev": 2, "hpa": 2, "monitoring": 2, "input-workers": 2}
WORKLOAD_KIND = {
  "replay": "StatefulSet",
  "trainer": "StatefulSet",
  "collector": "Deployment",
  "evaluator": "Deployment",
  "input-worker": "Deployment",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def kustomize(directory: pathlib.Path) -> tuple[list[dict], str]:
  """The rendered objects of a kustomization directory, and kustomize's warnings."""
  result = subprocess.run(
    ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
  return [doc for doc in yaml.safe_load_all(result.stdout) if doc], result.stderr


def render_variants(scratch: pathlib.Path) -> dict[str, tuple[list[dict], str]]:
  """Each variant's objects, and each of COMPOSED's (a variant plus components).

  A component cannot be rendered alone, so each of COMPOSED is a throwaway
  overlay in `scratch` (kustomize accepts only relative paths to other roots).
  """
  out = {name: kustomize(path) for name, path in VARIANTS.items()}
  for name, (variant, components) in COMPOSED.items():
    overlay = scratch / f"{name}-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
      yaml.safe_dump(
        {
          "apiVersion": "kustomize.config.k8s.io/v1beta1",
          "kind": "Kustomization",
          "resources": [os.path.relpath(VARIANTS[variant], overlay)],
          "components": [os.path.relpath(COMPONENTS / c, overlay) for c in components],
        }
      )
    )
    out[name] = kustomize(overlay)
  return out


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
  return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workload(objects: list[dict], role: str) -> dict:
  return by_kind(objects, WORKLOAD_KIND[role])[role]


def container(objects: list[dict], role: str) -> dict:
  (c,) = workload(objects, role)["spec"]["template"]["spec"]["containers"]
  return c


def tensorboard(objects: list[dict]) -> dict | None:
  """The tensorboard component's Deployment, if the variant has it."""
  return by_kind(objects, "Deployment").get("tensorboard")


def replay_addresses(objects: list[dict], c: dict) -> list[str]:
  """The replay shards a container's pod reaches (DQNFLEET_REPLAY_ADDRESSES), in order."""
  return configmap_data(objects, c)["DQNFLEET_REPLAY_ADDRESSES"].split(",")


def configmap_data(objects: list[dict], c: dict) -> dict[str, str]:
  """The variables a container's envFrom ConfigMaps give it."""
  configmaps = by_kind(objects, "ConfigMap")
  data = {}
  for source in c.get("envFrom", []):
    data.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
  return data


def pod_env(objects: list[dict], c: dict, pod_name: str) -> dict[str, str]:
  """A container's environment as the kubelet builds it: envFrom first, then env."""
  env = configmap_data(objects, c)
  for var in c.get("env", []):
    if "value" in var:
      env[var["name"]] = var["value"]
    else:  # only the downward API's pod name is used; anything else needs handling here
      assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, var
      env[var["name"]] = pod_name
  return env


def quantity(text) -> float:
  """A Kubernetes quantity ("250m", "1536Mi", "2") as a number."""
  units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
  number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(text)).groups()
  return float(number) * units.get(unit, 1)


def acted(actions, num_actions: int, q_values=None, epsilons=None):
  """A collect policy's PolicyStep as the observer receives it (collector.Collector.act):
  the actions, and as info the Q-values acted on (zeros unless given) and the epsilons."""
  import numpy as np
  from tf_agents.trajectories import policy_step

  actions = np.asarray(actions)
  info = {
    "q_values": np.zeros((len(actions), num_actions)) if q_values is None else q_values,
    "epsilon": np.zeros(len(actions), np.float32) if epsilons is None else epsilons,
  }
  return policy_step.PolicyStep(actions, (), info)


def tiny_specs(kind: str):
  """Environment specs built without an environment: "states" (4 floats, k=1, n=1, 2 actions)
  or "frames" (3x2 uint8 frames, k=4, n=3, 4 actions: an Atari layout in miniature)."""
  import numpy as np
  from tf_agents.specs import array_spec

  from dqnfleet.core.rl import specs

  if kind == "states":
    vector = array_spec.ArraySpec((4,), np.float32)
    return specs.EnvSpecs(vector, array_spec.BoundedArraySpec((), np.int64, 0, 1), vector, 1, 1)
  return specs.EnvSpecs(
    array_spec.ArraySpec((3, 2, 4), np.uint8),
    array_spec.BoundedArraySpec((), np.int64, 0, 3),
    array_spec.ArraySpec((3, 2), np.uint8),
    stack=4,
    n_step=3,
  )
