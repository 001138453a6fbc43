"""The Kubernetes manifests (deploy/k8s) as such: every overlay renders with
current kustomize fields into valid objects, and the Services, policies,
budgets, pods, replay shards, the gpu overlay and the hpa, service-monitor,
tensorboard and replay-shards components are what the fleet needs.

Every overlay is rendered with `kubectl kustomize` (the `rendered` fixture,
conftest.py) and validated offline, strictly, against the Kubernetes OpenAPI
schemas that `kubernetes-validate` ships (the Prometheus Operator's kinds
against the fields of their CRDs that the service-monitor component uses).
Agreement with docker-compose.yml and the settings is checked in
tests/test_deploy_agreement.py, the dev overlay run as processes in
tests/test_k8s_local_fleet.py. Needs `kubectl` and the `kubernetes-validate`
package: outside CI the tests that need them are skipped without them, in CI
(CI=true) they fail.
"""

import os
import re

import pytest
import yaml

from support import (
  COMPOSED,
  DEFAULT_METRICS_PORTS,
  K8S,
  PROBES,
  REPLAY_SHARDS,
  ROLES,
  ROOT,
  VARIANTS,
  by_kind,
  compose_default,
  compose_file,
  configmap_data,
  container,
  flag_values,
  opened_ports,
  quantity,
  replay_addresses,
  required,
  tensorboard,
  tensorboard_logdir,
  workload,
)

# The oldest release the manifests target (native gRPC probes are GA since
# 1.27, the PDB's unhealthyPodEvictionPolicy and the StatefulSet's PVC
# retention policy are on by default since 1.27), and the newest schemas the
# pinned kubernetes-validate ships, which catches APIs removed since.
KUBERNETES_VERSIONS = ("1.27", "1.37")
# Fields kustomize deprecated in favour of resources, labels, patches, ...
DEPRECATED_FIELDS = {
  "bases",
  "commonLabels",
  "patchesStrategicMerge",
  "patchesJson6902",
  "vars",
  "imageTags",
}


def selects(selector: dict, labels: dict) -> bool:
  """Whether a label selector (matchLabels and matchExpressions) matches `labels`."""
  if not selector.get("matchLabels", {}).items() <= labels.items():
    return False
  for e in selector.get("matchExpressions", []):
    present, value = e["key"] in labels, labels.get(e["key"])
    ok = {
      "In": present and value in e.get("values", []),
      "NotIn": not present or value not in e.get("values", []),
      "Exists": present,
      "DoesNotExist": not present,
    }[e["operator"]]
    if not ok:
      return False
  return True


def selected_pods(templates: dict[str, dict], selector: dict) -> set[str]:
  """The names of the pod templates a label selector matches."""
  return {name for name, t in templates.items() if selects(selector, t["metadata"]["labels"])}


# kubernetes-validate knows no custom resources: the Prometheus Operator's
# PodMonitor and ServiceMonitor (monitoring.coreos.com/v1) are checked against
# the fields of their CRDs (as of operator v0.93) that the service-monitor
# component uses, strictly, so that a misspelt or misplaced field fails here
# rather than being dropped by the API server.
_SELECTOR = {
  "type": "object",
  "additionalProperties": False,
  "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {
      "type": "array",
      "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["key", "operator"],
        "properties": {
          "key": {"type": "string"},
          "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
          "values": {"type": "array", "items": {"type": "string"}},
        },
      },
    },
  },
}
_ENDPOINTS = {
  "type": "array",
  "minItems": 1,
  "items": {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
      "port": {"type": "string", "minLength": 1},
      "path": {"type": "string", "pattern": "^/"},
      "interval": {
        "type": "string",
        "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
        r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
        r"(([0-9]+)ms)?)$",
      },
    },
  },
}


def _monitor_schema(endpoints_field: str) -> dict:
  return {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
      "apiVersion": {"const": "monitoring.coreos.com/v1"},
      "kind": {"type": "string"},
      "metadata": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
      },
      "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", endpoints_field],
        "properties": {
          "selector": _SELECTOR,
          "jobLabel": {"type": "string"},
          endpoints_field: _ENDPOINTS,
        },
      },
    },
  }


MONITOR_SCHEMAS = {
  "PodMonitor": _monitor_schema("podMetricsEndpoints"),
  "ServiceMonitor": _monitor_schema("endpoints"),
}


def test_kustomizations_use_current_fields_only(rendered):
  files = sorted(K8S.rglob("kustomization.yaml"))
  # base, dev, gpu, the HPA, tensorboard, service-monitor, replay-shards and input-workers
  # components
  assert len(files) == 8
  for path in files:
    fields = set(yaml.safe_load(path.read_text()))
    assert not fields & DEPRECATED_FIELDS, f"{path.relative_to(ROOT)}: {fields & DEPRECATED_FIELDS}"
  for name, (_, warnings) in rendered.items():
    assert "deprecated" not in warnings.lower(), f"{name}: {warnings}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", [*VARIANTS, *COMPOSED])
def test_rendered_objects_are_valid_kubernetes_objects(rendered, variant, version):
  """Strict: an unknown or misspelt field is an error, as are kinds without a schema."""
  try:
    import kubernetes_validate  # the schemas, offline; pinned in requirements.lock
  except ImportError:
    required("kubernetes-validate (pip)")
  import jsonschema  # kubernetes-validate's own dependency

  objects, _ = rendered[variant]
  problems = []
  for obj in objects:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
      for e in jsonschema.Draft202012Validator(MONITOR_SCHEMAS.get(obj["kind"], False)).iter_errors(
        obj
      ):
        problems.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
      continue
    try:
      kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
      problems.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
      problems.append(f"{name}: {e.message}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", [*VARIANTS, "monitoring"])
def test_services_policies_and_budgets_select_the_right_pods(rendered, variant):
  objects, _ = rendered[variant]
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}
  # The tensorboard component's pod, where the variant has it (dev, monitoring).
  board = tensorboard(objects)
  assert (board is not None) == (variant in ("dev", "monitoring")), variant
  if board:
    templates["tensorboard"] = board["spec"]["template"]
    assert selected_pods(templates, board["spec"]["selector"]) == {"tensorboard"}

  def selected(match_labels: dict) -> set[str]:
    return selected_pods(templates, {"matchLabels": match_labels})

  def listens(name: str) -> set[int]:
    if name == "tensorboard":
      (c,) = board["spec"]["template"]["spec"]["containers"]
      return {p["containerPort"] for p in c["ports"]}
    return opened_ports(container(objects, name)["args"])

  for role in ROLES:
    assert selected(workload(objects, role)["spec"]["selector"]["matchLabels"]) == {role}
  services = by_kind(objects, "Service")
  # Nothing connects to a collector or the evaluator (Prometheus finds pods by themselves).
  assert set(services) == {"replay", "trainer"} | ({"tensorboard"} if board else set())
  for name, service in services.items():
    assert selected(service["spec"]["selector"]) == {name}
    if name != "tensorboard":
      assert workload(objects, name)["spec"]["serviceName"] == name
    (c,) = templates[name]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The same numbers as in the pod, so `replay:8001` means what it means in compose.
    ports = [named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]]
    assert ports == [p["port"] for p in service["spec"]["ports"]]
    # Every port the pod opens, metrics included (the ServiceMonitor scrapes through it).
    assert sorted(ports) == sorted(listens(name)), name
  # Every host:port in the args and address settings names a Service port:
  # `trainer:8010`, or a pod of the StatefulSet behind a headless Service,
  # `replay-1.replay:8000`.
  statefulsets = {s["spec"]["serviceName"]: s for s in by_kind(objects, "StatefulSet").values()}
  for role in ROLES:
    c = container(objects, role)
    values = list(flag_values(c["args"]).values())
    if role in ("trainer", "collector"):
      values += replay_addresses(objects, c)
    for value in values:
      if m := re.fullmatch(r"(?:([a-z0-9-]+)\.)?([a-z0-9-]+):(\d+)", value):
        pod, service, port = m[1], m[2], int(m[3])
        assert port in {p["port"] for p in services[service]["spec"]["ports"]}, value
        if pod:
          assert services[service]["spec"].get("clusterIP") == "None", value  # per-pod DNS
          owner = statefulsets[service]
          ordinals = range(owner["spec"]["replicas"])
          assert pod in {f"{owner['metadata']['name']}-{i}" for i in ordinals}, value

  policies = {n: p["spec"] for n, p in by_kind(objects, "NetworkPolicy").items()}
  # (target, port) -> who may connect: roles, None for any pod of the namespace,
  # "cluster" for any pod of any namespace (Prometheus lives in one of its own).
  allowed = {}
  for spec in policies.values():
    (target,) = selected(spec["podSelector"]["matchLabels"])
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
      sources = set()
      for peer in rule["from"]:
        if "namespaceSelector" in peer:
          assert peer == {"namespaceSelector": {}}, peer
          sources.add("cluster")
        else:
          labels = peer["podSelector"].get("matchLabels")
          sources |= selected(labels) if labels else {None}
      for port in rule["ports"]:
        assert port["port"] in listens(target)
        assert (target, port["port"]) not in allowed, (target, port)
        allowed[(target, port["port"])] = sources
  expected = {
    ("replay", 8000): {"collector", "trainer"},
    ("replay", 8001): {None},
    ("trainer", 8010): {"collector", "evaluator"},
    ("collector", 8020): {None},
    ("evaluator", 8030): {None},
  }
  expected |= {(role, port): {"cluster"} for role, port in DEFAULT_METRICS_PORTS.items()}
  if board:
    expected[("tensorboard", 6006)] = {None}
  assert allowed == expected

  budgets = {n: b["spec"] for n, b in by_kind(objects, "PodDisruptionBudget").items()}
  assert set(budgets) == set(ROLES)  # TensorBoard is disposable: drains may always evict it
  for role in ROLES:
    assert selected(budgets[role]["selector"]["matchLabels"]) == {role}
  # Singletons: drains may evict them (0 would block drains forever). Replay
  # shards too, one at a time: the others carry on.
  for role in ("trainer", "evaluator"):
    assert workload(objects, role)["spec"]["replicas"] == 1, role
  for role in ("replay", "trainer", "evaluator"):
    assert budgets[role]["maxUnavailable"] == 1, role
  assert budgets["collector"]["maxUnavailable"] == "50%"


@pytest.mark.parametrize("variant", [*VARIANTS, *COMPOSED])
def test_replay_shards_are_the_replicas_and_clients_name_each_one(rendered, variant):
  """N replicas of the replay StatefulSet, each a shard with its own claim and
  DNS name behind the headless Service; the trainer and collectors list
  exactly those names, at Reverb's port, from one ConfigMap."""
  objects, _ = rendered[variant]
  replay = workload(objects, "replay")
  spec = replay["spec"]
  shards = spec["replicas"]
  assert shards == REPLAY_SHARDS[variant]
  service = by_kind(objects, "Service")[spec["serviceName"]]["spec"]
  # Headless: a DNS record per pod, and none that balances over the shards.
  assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
  # Started and restored at once, none waiting for another to be ready.
  assert spec["podManagementPolicy"] == "Parallel"
  reverb = int(flag_values(container(objects, "replay")["args"])["--port"])
  assert reverb in {p["port"] for p in service["ports"]}
  expected = [
    f"{replay['metadata']['name']}-{i}.{spec['serviceName']}:{reverb}" for i in range(shards)
  ]
  sources = set()
  for role in ("trainer", "collector"):
    c = container(objects, role)
    assert replay_addresses(objects, c) == expected, role
    configmaps = by_kind(objects, "ConfigMap")
    sources |= {
      s["configMapRef"]["name"]
      for s in c["envFrom"]
      if "DQNFLEET_REPLAY_ADDRESSES" in configmaps[s["configMapRef"]["name"]].get("data", {})
    }
  # One place for the list: the trainer cannot sample other shards than collectors fill.
  (source,) = sources
  assert source.startswith("dqnfleet-replay-addresses-")
  # Each shard restores its own table: one claim per pod, from the template.
  (claim,) = spec["volumeClaimTemplates"]
  assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
  mounts = {m["name"]: m["mountPath"] for m in container(objects, "replay")["volumeMounts"]}
  checkpoints = flag_values(container(objects, "replay")["args"])["--checkpoint-dir"]
  assert checkpoints == mounts[claim["metadata"]["name"]]
  # Spread over nodes where it can be, never refused a node for it.
  (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
    "preferredDuringSchedulingIgnoredDuringExecution"
  ]
  assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
  assert selects(term["podAffinityTerm"]["labelSelector"], spec["template"]["metadata"]["labels"])


def assert_locked_down_and_sized(pod: dict, c: dict, name: str) -> None:
  """What every pod of the fleet has: non-root, read-only, no token, requests and limits."""
  # These at least (fsGroupChangePolicy may come with them).
  assert pod["securityContext"] == {
    **pod["securityContext"],
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
  }, name
  assert c["securityContext"] == {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
  }, name
  assert pod["enableServiceLinks"] is False  # no injected *_PORT variables next to the settings
  assert pod["automountServiceAccountToken"] is False
  for kind in ("cpu", "memory"):
    request, limit = (quantity(c["resources"][k][kind]) for k in ("requests", "limits"))
    assert 0 < request <= limit, f"{name} {kind}"


@pytest.mark.parametrize("variant", [*VARIANTS, "monitoring"])
def test_pods_are_locked_down_and_sized(rendered, variant):
  objects, _ = rendered[variant]
  claims = by_kind(objects, "PersistentVolumeClaim")
  claimed = set()
  if board := tensorboard(objects):  # its volumes: test_the_tensorboard_component_...
    (c,) = board["spec"]["template"]["spec"]["containers"]
    assert_locked_down_and_sized(board["spec"]["template"]["spec"], c, "tensorboard")
  for role in ROLES:
    pod = workload(objects, role)["spec"]["template"]["spec"]
    c = container(objects, role)
    assert_locked_down_and_sized(pod, c, role)
    # Writable: /tmp (an emptyDir; TMPDIR=/tmp in the image) and the data volume alone.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert "emptyDir" in volumes[mounts.pop("/tmp")]
    data_dirs = {v for f, v in flag_values(c["args"]).items() if v.startswith("/data/")}

    def under(path: str, mount: str) -> bool:
      return path == mount or path.startswith(mount + "/")

    # Each path in the args on a data volume, and each data volume used (collectors: none).
    assert all(any(under(d, m) for m in mounts) for d in data_dirs), role
    assert all(any(under(d, m) for d in data_dirs) for m in mounts), role
    # A data volume is a claim: a StatefulSet's per-pod claim template, or a
    # standalone PersistentVolumeClaim (the evaluator's).
    templates = {
      t["metadata"]["name"] for t in workload(objects, role)["spec"].get("volumeClaimTemplates", [])
    }
    standalone = {
      name: volumes[name]["persistentVolumeClaim"]["claimName"]
      for name in mounts.values()
      if "persistentVolumeClaim" in volumes.get(name, {})
    }
    assert set(mounts.values()) == templates | set(standalone), role
    assert not templates & set(standalone) and not templates & set(volumes), role
    claimed |= set(standalone.values())
    if standalone:
      # A ReadWriteOnce claim has one pod at a time: one replica, and the old
      # pod gone before the new one starts (a rolling update would wait forever).
      w = workload(objects, role)
      assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 1, role
      assert w["spec"]["strategy"] == {"type": "Recreate"}, role
      for claim in standalone.values():
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"], claim
        assert quantity(claims[claim]["spec"]["resources"]["requests"]["storage"]) > 0, claim
        assert claims[claim]["metadata"]["labels"]["app.kubernetes.io/component"] == role, claim
  assert claimed == set(claims) == {"evaluator-data"}  # no claim without its pod
  collector = container(objects, "collector")
  ids = [v for v in collector["env"] if v["name"] == "DQNFLEET_COLLECTOR_ID"]
  assert ids == [
    {"name": "DQNFLEET_COLLECTOR_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
  ]
  assert configmap_data(objects, collector).get("DQNFLEET_SEED", "") == ""  # derived from the id


def test_gpu_overlay_puts_only_the_trainer_on_a_gpu(rendered):
  objects, _ = rendered["gpu"]
  trainer = container(objects, "trainer")
  assert trainer["image"] == "dqnfleet:gpu"
  assert str(trainer["resources"]["limits"]["nvidia.com/gpu"]) == "1"
  for role in ("replay", "collector", "evaluator"):
    c = container(objects, role)
    assert c["image"] == "dqnfleet:latest" and "nvidia.com/gpu" not in c["resources"]["limits"]
  base_objects, _ = rendered["base"]
  assert configmap_data(base_objects, trainer) == configmap_data(objects, trainer)


def test_the_hpa_component_owns_the_collector_count(rendered):
  dev, _ = rendered["dev"]
  objects, _ = rendered["hpa"]
  assert workload(dev, "collector")["spec"]["replicas"] == 2
  assert "replicas" not in workload(objects, "collector")["spec"]  # or each apply resets it
  (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
  assert hpa["apiVersion"] == "autoscaling/v2"
  assert hpa["spec"]["scaleTargetRef"] == {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "name": "collector",
  }
  assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
  assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] < 256


def test_the_monitors_scrape_every_role_once_at_its_metrics_port(rendered):
  """The service-monitor component: replay and trainer through their Services,
  collectors (no Service, any number) and the evaluator as pods."""
  objects, _ = rendered["monitoring"]
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}
  templates["tensorboard"] = tensorboard(objects)["spec"]["template"]  # must not be scraped
  services = by_kind(objects, "Service")
  interval = yaml.safe_load((ROOT / "deploy/monitoring/prometheus.yml").read_text())["global"][
    "scrape_interval"
  ]
  scraped = []  # (role, container port, path, how)
  for monitor in by_kind(objects, "ServiceMonitor").values():
    spec = monitor["spec"]
    assert "namespaceSelector" not in spec  # its own namespace, the fleet's
    for service in services.values():
      if not selects(spec["selector"], service["metadata"]["labels"]):
        continue
      (role,) = selected_pods(templates, {"matchLabels": service["spec"]["selector"]})
      named = {p["name"]: p["containerPort"] for p in container(objects, role)["ports"]}
      for endpoint in spec["endpoints"]:
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        scraped.append(
          (
            role,
            named.get(port["targetPort"], port["targetPort"]),
            endpoint.get("path", "/metrics"),
            "service",
          )
        )
        assert endpoint["interval"] == interval  # as in compose: the dashboard's rates expect it
  for monitor in by_kind(objects, "PodMonitor").values():
    spec = monitor["spec"]
    assert "namespaceSelector" not in spec
    for role in selected_pods(templates, spec["selector"]):
      labels = templates[role]["metadata"]["labels"]
      # The job label is the pod's component, like compose's job names.
      assert labels[spec["jobLabel"]] == role
      (c,) = templates[role]["spec"]["containers"]
      for endpoint in spec["podMetricsEndpoints"]:
        (port,) = [p for p in c["ports"] if p["name"] == endpoint["port"]]
        scraped.append((role, port["containerPort"], endpoint.get("path", "/metrics"), "pod"))
        assert endpoint["interval"] == interval
  assert sorted(scraped) == sorted(
    (role, port, "/metrics", "service" if role in services else "pod")
    for role, port in DEFAULT_METRICS_PORTS.items()
  )
  # Through a Service, Prometheus scrapes each of its endpoints: every replay
  # shard is a target of its own, not-ready ones included (restoring shards).
  assert REPLAY_SHARDS["monitoring"] > 1
  assert services["replay"]["spec"]["publishNotReadyAddresses"] is True
  for monitor in [
    *by_kind(objects, "ServiceMonitor").values(),
    *by_kind(objects, "PodMonitor").values(),
  ]:
    assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dqnfleet"


@pytest.mark.parametrize("variant", ["dev", "monitoring"])
def test_the_tensorboard_component_reads_the_trainers_volume(rendered, variant):
  """Compose's tensorboard profile on Kubernetes: the trainer's claim, read-only,
  from a pod on the trainer's node (the claim is ReadWriteOnce)."""
  objects, _ = rendered[variant]
  board = tensorboard(objects)
  spec = board["spec"]
  pod = spec["template"]["spec"]
  (c,) = pod["containers"]
  profile = compose_file()["services"]["tensorboard"]
  assert c["image"] == compose_default(profile["image"])
  assert c["command"] == profile["entrypoint"] + profile["command"] and "args" not in c
  logdir = tensorboard_logdir(c["command"])
  (port,) = c["ports"]
  assert f"--port={port['containerPort']}" in c["command"]
  for probe in PROBES:
    assert c[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe
  # Where the trainer writes every service's summaries.
  trainer, trainer_container = workload(objects, "trainer"), container(objects, "trainer")
  assert logdir == flag_values(trainer_container["args"])["--run-dir"] + "/tensorboard"
  (claim,) = trainer["spec"]["volumeClaimTemplates"]
  assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
  trainer_path = {m["name"]: m["mountPath"] for m in trainer_container["volumeMounts"]}[
    claim["metadata"]["name"]
  ]
  assert logdir.startswith(trainer_path + "/")
  mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
  volumes = {v["name"]: v for v in pod["volumes"]}
  assert set(mounts) == {trainer_path, "/tmp"}
  assert mounts[trainer_path].get("readOnly") is True
  # A StatefulSet's claims are named <template>-<StatefulSet>-<ordinal>.
  assert volumes[mounts[trainer_path]["name"]]["persistentVolumeClaim"] == {
    "claimName": f"{claim['metadata']['name']}-{trainer['metadata']['name']}-0",
    "readOnly": True,
  }
  assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
  (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
  assert term["topologyKey"] == "kubernetes.io/hostname"
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}
  assert selected_pods(templates, term["labelSelector"]) == {"trainer"}
  # One pod, the old one gone before the new one mounts the claim.
  assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}


def test_the_input_workers_component_connects_workers_trainer_and_replay(rendered, monkeypatch):
  """Input workers register with the dispatcher port the trainer opens (its setting, its
  Service and its NetworkPolicy), replay lets them sample, and only the trainer fetches
  from them; every port they use is one they open, with valid settings."""
  from dqnfleet.cli.commands import COMMANDS
  from dqnfleet.cli.main import build_configs, build_parser
  from dqnfleet.core.settings.config import InputWorkerConfig

  objects, _ = rendered["input-workers"]
  trainer = configmap_data(objects, container(objects, "trainer"))
  port = int(trainer["DQNFLEET_INPUT_DISPATCHER_PORT"])
  worker = container(objects, "input-worker")
  for name in [n for n in os.environ if n.startswith("DQNFLEET_")]:
    monkeypatch.delenv(name)
  config = build_configs(COMMANDS["input-worker"], build_parser().parse_args(worker["args"]))[
    InputWorkerConfig
  ]
  assert config.dispatcher_address == f"trainer:{port}"
  assert not config.worker_address  # each pod tells its own IP
  assert {p["containerPort"] for p in worker["ports"]} == {
    config.port,
    config.status_port,
    config.metrics_port,
  }
  for probe in PROBES:
    assert worker[probe]["grpc"]["port"] == config.status_port, probe
  assert port in [p["port"] for p in by_kind(objects, "Service")["trainer"]["spec"]["ports"]]

  def allowed(policy: str, port: int) -> list[str]:
    """The components whose pods may reach `port` of the policy's pods."""
    rules = by_kind(objects, "NetworkPolicy")[policy]["spec"]["ingress"]
    return [
      peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
      for rule in rules
      if port in [p["port"] for p in rule["ports"]]
      for peer in rule["from"]
      if peer.get("podSelector", {}).get("matchLabels")
    ]

  assert allowed("trainer", port) == ["input-worker"]
  assert "input-worker" in allowed("replay", 8000)
  assert allowed("input-worker", config.port) == ["trainer"]
  # Without the component the trainer samples itself and no worker runs.
  base, _ = rendered["dev"]
  assert not configmap_data(base, container(base, "trainer")).get("DQNFLEET_INPUT_DISPATCHER_PORT")
  assert "input-worker" not in by_kind(base, "Deployment")
