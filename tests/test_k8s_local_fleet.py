"""The dev overlay of the Kubernetes manifests (deploy/k8s/overlays/dev), run:
its pods as local processes, with the args and settings read from the rendered
manifests, train as a fleet with replay in two shards that both fill, the
evaluator evaluates, every pod serves its metrics where its annotations say,
and each stops within its grace period.

The manifests are rendered with `kubectl kustomize` (the `rendered` fixture,
conftest.py); outside CI the test is skipped without it, in CI (CI=true) it fails.
"""

import dataclasses
import os
import pathlib
import re

import psutil
import pytest

from dqnfleet.core.settings.flags import ENV_PREFIX
from dqnfleet.core.transport import rpc
from support import (
  METRICS,
  REPLAY_SHARDS,
  ROLES,
  by_kind,
  configmap_data,
  flag_values,
  free_port,
  metric_families,
  pod_env,
  quantity,
  tensorboard,
  tensorboard_logdir,
  wait_until,
  workload,
)

pytestmark = pytest.mark.slow  # a whole fleet of processes, minutes


@dataclasses.dataclass
class LocalPod:
  """One pod of the rendered dev overlay, to be run as a local process."""

  name: str  # the name Kubernetes would give it (replay-0, ...)
  role: str
  container: dict
  spec: dict  # the pod spec
  labels: dict
  ports: dict = dataclasses.field(default_factory=dict)  # containerPort -> local port
  mounts: dict = dataclasses.field(default_factory=dict)  # mountPath -> local directory


def local_pods(objects: list[dict], root: pathlib.Path) -> list[LocalPod]:
  """Every pod the workloads ask for, each with its own free ports and directories."""
  pods = []
  for role in ROLES:
    w = workload(objects, role)
    for i in range(w["spec"]["replicas"]):
      # StatefulSet pods are <name>-<ordinal>; a Deployment's get random suffixes.
      name = f"{role}-{i}" if w["kind"] == "StatefulSet" else f"{role}-local-{i}"
      template = w["spec"]["template"]
      (c,) = template["spec"]["containers"]
      pod = LocalPod(name, role, c, template["spec"], template["metadata"]["labels"])
      pod.ports = {p["containerPort"]: free_port() for p in c["ports"]}
      volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
      for mount in c["volumeMounts"]:
        # A standalone claim (the evaluator's) is one directory for whichever
        # pod mounts it; a claim template's volume or an emptyDir is the pod's own.
        claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim")
        directory = root / "claims" / claim["claimName"] if claim else root / name / mount["name"]
        directory.mkdir(parents=True, exist_ok=claim is not None)
        pod.mounts[mount["mountPath"]] = directory
      pods.append(pod)
  return pods


def local_address(objects: list[dict], pods: list[LocalPod], value: str) -> str | None:
  """What `service:port` (the Service's one pod) or `pod.service:port` (that pod,
  behind a headless Service: a replay shard) reaches in the cluster, on
  loopback; None if `value` names no Service."""
  address = re.fullmatch(r"(?:([a-z0-9-]+)\.)?([a-z0-9-]+):(\d+)", value)
  services = by_kind(objects, "Service")
  if not address or address[2] not in services:
    return None
  pod_name, service, port = address[1], services[address[2]]["spec"], int(address[3])
  (target,) = [
    p
    for p in pods
    if service["selector"].items() <= p.labels.items() and pod_name in (None, p.name)
  ]
  (entry,) = [e for e in service["ports"] if e["port"] == port]
  named = {p["name"]: p["containerPort"] for p in target.container["ports"]}
  return f"localhost:{target.ports[named.get(entry['targetPort'], entry['targetPort'])]}"


def local_args(objects: list[dict], pods: list[LocalPod], pod: LocalPod) -> list[str]:
  """The container's args with the cluster's names, ports and paths made local.

  Three rewrites, nothing else: `service:port` -> the loopback port of the pod
  behind that Service; a --*port=N the container exposes -> this pod's own free
  port (two collectors cannot both listen on 8020 here); a path under a volume
  mount -> the pod's local directory for that volume.
  """
  args = [pod.container["args"][0]]
  for flag, value in flag_values(pod.container["args"]).items():
    address = local_address(objects, pods, value)
    mount = next((m for m in pod.mounts if value == m or value.startswith(m + "/")), None)
    if address:
      value = address
    elif flag.endswith("port") and int(value) in pod.ports:
      value = str(pod.ports[int(value)])
    elif mount:
      value = str(pod.mounts[mount]) + value[len(mount) :]
    args.append(f"{flag}={value}")
  return args


def local_env(objects: list[dict], pods: list[LocalPod], pod: LocalPod) -> dict[str, str]:
  """The pod's environment, its address lists (the replay shards') made local."""
  env = {name: "" for name in os.environ if name.startswith(ENV_PREFIX)}  # empty = default
  for name, value in pod_env(objects, pod.container, pod.name).items():
    addresses = [local_address(objects, pods, part) for part in value.split(",")]
    env[name] = ",".join(addresses) if value and all(addresses) else value
  if "/tmp" in pod.mounts:  # the image's TMPDIR, an emptyDir per pod
    env["TMPDIR"] = str(pod.mounts["/tmp"])
  return env


def health_address(pod: LocalPod) -> str:
  """Where the kubelet's probes (and `dqnfleet status`) reach this pod, on loopback."""
  return f"localhost:{pod.ports[pod.container['readinessProbe']['grpc']['port']]}"


def test_the_dev_overlay_runs_as_a_fleet_that_trains(rendered, services, tmp_path):
  objects, _ = rendered["dev"]
  pods = local_pods(objects, tmp_path)
  assert [p.role for p in pods].count("collector") == 2
  assert [p.role for p in pods].count("evaluator") == 1
  started = {}
  for pod in pods:
    args = local_args(objects, pods, pod)
    print(pod.name, "dqnfleet", *args)
    env = local_env(objects, pods, pod)
    if "DQNFLEET_REPLAY_ADDRESSES" in env:
      print(" ", "DQNFLEET_REPLAY_ADDRESSES", env["DQNFLEET_REPLAY_ADDRESSES"])
    started[pod.name] = services(pod.name, *args, env=env)
  by_role = {role: [p for p in pods if p.role == role] for role in ROLES}
  (trainer,), (evaluator,) = by_role["trainer"], by_role["evaluator"]
  shards = by_role["replay"]
  assert [p.name for p in shards] == [f"replay-{i}" for i in range(REPLAY_SHARDS["dev"])]
  peak_rss = {p.name: 0 for p in pods}

  def status(pod: LocalPod):
    peak_rss[pod.name] = max(
      peak_rss[pod.name], psutil.Process(started[pod.name].proc.pid).memory_info().rss
    )
    return rpc.get_status(health_address(pod), timeout=5)

  def alive():
    """Fails at once if a service died (wait_until would retry an assertion until its timeout)."""
    for name, service in started.items():
      if service.proc.poll() is not None:
        pytest.fail(f"{name} exited with {service.proc.returncode}:\n{service.log()[-3000:]}")
    return True

  # What the startup probes wait for: every pod's health port answers SERVING.
  for pod in pods:
    wait_until(
      lambda: alive() and rpc.check_health(health_address(pod)),
      240,
      f"{pod.name} to answer its health probe",
      interval=2,
    )
  # The collectors spread their writes over every shard: each fills to its own min size.
  min_size = int(configmap_data(objects, shards[0].container)["DQNFLEET_MIN_SIZE"])
  for shard in shards:
    wait_until(
      lambda: alive() and status(shard).replay_size >= min_size,
      180,
      f"{shard.name} to fill to the dev overlay's min size",
      interval=2,
    )
  wait_until(
    lambda: alive() and status(trainer).counters.train_steps > 0,
    180,
    "the trainer to train",
    interval=2,
  )
  reports = {}
  for pod in by_role["collector"]:
    reports[pod.name] = wait_until(
      lambda: alive() and (s := status(pod)).policy_version > 0 and s,
      180,
      f"{pod.name} to act with a published policy",
      interval=2,
    )
  # Each replica its own id (the pod name, from the downward API) and seed.
  assert {r.id for r in reports.values()} == set(reports)
  assert len({r.counters.seed for r in reports.values()}) == len(reports)
  # The evaluator evaluates the first version it receives at once (later ones
  # every DQNFLEET_EVERY_MINUTES) and reports the result.
  evaluation = wait_until(
    lambda: alive() and (s := status(evaluator)).counters.evaluations >= 1 and s,
    240,
    "the evaluator's first evaluation",
    interval=2,
  )
  assert evaluation.role == "evaluator" and evaluation.policy_version >= 0
  # Each pod serves, where its annotations tell Prometheus to look, the
  # metrics the Grafana dashboard may use (support.METRICS).
  for pod in pods:
    annotations = workload(objects, pod.role)["spec"]["template"]["metadata"]["annotations"]
    families = metric_families(
      pod.ports[int(annotations["prometheus.io/port"])], annotations["prometheus.io/path"]
    )
    names = {f.name for f in families} | {s.name for f in families for s in f.samples}
    expected = METRICS[pod.role] | METRICS["every service"] | METRICS["process"]
    assert not expected - names, (pod.name, expected - names)
    (info,) = [s for f in families for s in f.samples if s.name == "dqnfleet_build_info"]
    assert info.labels["role"] == pod.role and info.value == 1, (pod.name, info)
  # Every service's summaries reach the trainer's claim, where the overlay's
  # TensorBoard looks: collectors and the evaluator send theirs to the trainer
  # every few seconds, and it flushes them as often.
  (trainer_mount,) = [m for m in trainer.mounts if m != "/tmp"]
  logdir = tensorboard_logdir(
    tensorboard(objects)["spec"]["template"]["spec"]["containers"][0]["command"]
  )
  local_logdir = trainer.mounts[trainer_mount] / pathlib.PurePosixPath(logdir).relative_to(
    trainer_mount
  )
  for run in ("trainer", "collectors", "evaluator"):
    wait_until(
      lambda: alive() and list((local_logdir / run).rglob("events.out.tfevents.*")),
      120,
      f"{run} summaries in the trainer's logdir",
      interval=2,
    )
  for pod in pods:
    status(pod)
  print("peak resident memory (MiB):", {n: round(r / 2**20) for n, r in peak_rss.items()})

  # SIGTERM, as the kubelet stops a pod, within its grace period; replay
  # writes its checkpoint and the trainer its own, both to their volumes.
  for role in ("evaluator", "collector", "trainer", "replay"):
    for pod in by_role[role]:
      grace = pod.spec.get("terminationGracePeriodSeconds", 30)
      assert started[pod.name].stop(timeout=grace) == 0, started[pod.name].log()[-3000:]
  for shard in shards:
    (replay_dir,) = [d for m, d in shard.mounts.items() if m != "/tmp"]
    assert any(replay_dir.iterdir()), f"no replay checkpoint on {shard.name}'s volume"
  (trainer_dir,) = [d for m, d in trainer.mounts.items() if m != "/tmp"]
  assert any((trainer_dir / "checkpoints").iterdir()) and any((trainer_dir / "policies").iterdir())
  # The evaluator's results are on its own (standalone) claim.
  (evaluator_dir,) = [d for m, d in evaluator.mounts.items() if m != "/tmp"]
  history = (evaluator_dir / "history.jsonl").read_text().splitlines()
  assert len(history) >= evaluation.counters.evaluations
  # The dev overlay's memory limits leave room above what the processes used here.
  for pod in pods:
    limit = quantity(pod.container["resources"]["limits"]["memory"])
    assert peak_rss[pod.name] < 0.75 * limit, (pod.name, peak_rss[pod.name], limit)
