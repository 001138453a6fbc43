"""The Kubernetes manifests (deploy/k8s): valid, in step with docker-compose.yml
and the settings, and runnable.

Every overlay is rendered with `kubectl kustomize` and validated offline,
strictly, against the Kubernetes OpenAPI schemas that `kubernetes-validate`
ships (the Prometheus Operator's kinds against the fields of their CRDs that
the service-monitor component uses). The last test runs the dev overlay's
pods as local processes (their args and settings, read from the rendered
manifests) and checks that the fleet trains and the evaluator evaluates.
Needs `kubectl` and the `kubernetes-validate` package: outside CI the tests
that need them are skipped without them, in CI (CI=true) they fail.
"""
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import urllib.request

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dqnfleet.cli.main import SERVICE_GROUPS, build_configs, build_parser
from dqnfleet.core import config as config_module
from dqnfleet.core.transport import rpc
from dqnfleet.core.settings.flags import ENV_PREFIX, env_name

from conftest import free_port, wait_until
from test_monitoring import METRICS

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
COMPONENTS = K8S / "components"
# Rendered on top of a variant in a throwaway overlay: name -> (variant, components).
# "monitoring" is both monitoring components on the gpu overlay, which has
# neither (the dev overlay includes the tensorboard component itself).
COMPOSED = {"hpa": ("dev", ["collector-hpa"]),
            "monitoring": ("gpu", ["tensorboard", "service-monitor"])}
# The oldest release the manifests target (native gRPC probes are GA since
# 1.27, the PDB's unhealthyPodEvictionPolicy and the StatefulSet's PVC
# retention policy are on by default since 1.27), and the newest schemas the
# pinned kubernetes-validate ships, which catches APIs removed since.
KUBERNETES_VERSIONS = ("1.27", "1.37")
# Fields kustomize deprecated in favour of resources, labels, patches, ...
DEPRECATED_FIELDS = {"bases", "commonLabels", "patchesStrategicMerge", "patchesJson6902", "vars",
                     "imageTags"}
ROLES = ("replay", "trainer", "collector", "evaluator")
WORKLOAD_KIND = {"replay": "StatefulSet", "trainer": "StatefulSet", "collector": "Deployment",
                 "evaluator": "Deployment"}
# The services that must agree on the environment (EnvConfig): the replay item
# layout depends on it. The evaluator learns it from the trainer's policy API.
TRAINING_ROLES = ("replay", "trainer", "collector")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
DEFAULT_METRICS_PORTS = {"replay": config_module.DEFAULT_REPLAY_METRICS_PORT,
                         "trainer": config_module.DEFAULT_TRAINER_METRICS_PORT,
                         "collector": config_module.DEFAULT_COLLECTOR_METRICS_PORT,
                         "evaluator": config_module.DEFAULT_EVALUATOR_METRICS_PORT}


def required(what: str):
  """Skips the test without `what` outside CI; in CI (CI=true) fails instead."""
  if os.environ.get("CI"):
    pytest.fail(f"{what} is required in CI")
  pytest.skip(f"no {what}")


def kustomize(directory: pathlib.Path) -> tuple[list[dict], str]:
  """The rendered objects of a kustomization directory, and kustomize's warnings."""
  result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
  return [doc for doc in yaml.safe_load_all(result.stdout) if doc], result.stderr


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[list[dict], str]]:
  """Each variant's objects, and each of COMPOSED's (a variant plus components).

  A component cannot be rendered alone, so each of COMPOSED is a throwaway
  overlay in a temporary directory (kustomize accepts only relative paths to
  other roots).
  """
  if not shutil.which("kubectl"):
    required("kubectl (to render deploy/k8s)")
  out = {name: kustomize(path) for name, path in VARIANTS.items()}
  for name, (variant, components) in COMPOSED.items():
    overlay = tmp_path_factory.mktemp(f"{name}-overlay")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(VARIANTS[variant], overlay)],
        "components": [os.path.relpath(COMPONENTS / c, overlay) for c in components]}))
    out[name] = kustomize(overlay)
  return out


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
  return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workload(objects: list[dict], role: str) -> dict:
  return by_kind(objects, WORKLOAD_KIND[role])[role]


def container(objects: list[dict], role: str) -> dict:
  (c,) = workload(objects, role)["spec"]["template"]["spec"]["containers"]
  return c


def flag_values(args: list[str]) -> dict[str, str]:
  """--name=value flags of a container's args (after the role)."""
  values = {}
  for arg in args[1:]:
    flag, sep, value = arg.partition("=")
    assert arg.startswith("--") and sep, f"{arg!r}: write flags as --name=value"
    values[flag] = value
  return values


def opened_ports(args: list[str]) -> set[int]:
  """The ports a service listens on: the values of its --port / --*-port flags."""
  return {int(v) for flag, v in flag_values(args).items() if flag.endswith("port")}


def compose_file(name: str = "docker-compose.yml") -> dict:
  return yaml.safe_load((ROOT / name).read_text())  # resolves the x-* anchors and `<<:` merges


def compose_default(value: str) -> str:
  """`${VAR:-default}` -> default, as compose resolves it with VAR unset."""
  return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def repository(image: str) -> str:
  return re.sub(r"(@sha256:[0-9a-f]+|:[\w.-]+)$", "", image)


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


def role_settings(role: str) -> set[str]:
  return {env_name(f) for group in SERVICE_GROUPS[role] for f in dataclasses.fields(group)}


def quantity(text) -> float:
  """A Kubernetes quantity ("250m", "1536Mi", "2") as a number."""
  units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
  number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(text)).groups()
  return float(number) * units.get(unit, 1)


def selects(selector: dict, labels: dict) -> bool:
  """Whether a label selector (matchLabels and matchExpressions) matches `labels`."""
  if not selector.get("matchLabels", {}).items() <= labels.items():
    return False
  for e in selector.get("matchExpressions", []):
    present, value = e["key"] in labels, labels.get(e["key"])
    ok = {"In": present and value in e.get("values", []),
          "NotIn": not present or value not in e.get("values", []),
          "Exists": present, "DoesNotExist": not present}[e["operator"]]
    if not ok:
      return False
  return True


def selected_pods(templates: dict[str, dict], selector: dict) -> set[str]:
  """The names of the pod templates a label selector matches."""
  return {name for name, t in templates.items() if selects(selector, t["metadata"]["labels"])}


def tensorboard(objects: list[dict]) -> dict | None:
  """The tensorboard component's Deployment, if the variant has it."""
  return by_kind(objects, "Deployment").get("tensorboard")


# kubernetes-validate knows no custom resources: the Prometheus Operator's
# PodMonitor and ServiceMonitor (monitoring.coreos.com/v1) are checked against
# the fields of their CRDs (as of operator v0.93) that the service-monitor
# component uses, strictly, so that a misspelt or misplaced field fails here
# rather than being dropped by the API server.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"},
                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_ENDPOINTS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "additionalProperties": False, "required": ["port"], "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                                  r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                                                  r"(([0-9]+)ms)?)$"}}}}


def _monitor_schema(endpoints_field: str) -> dict:
  return {"type": "object", "additionalProperties": False,
          "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
              "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
              "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                           "properties": {"name": {"type": "string"},
                                          "labels": {"type": "object"}}},
              "spec": {"type": "object", "additionalProperties": False,
                       "required": ["selector", endpoints_field], "properties": {
                           "selector": _SELECTOR, "jobLabel": {"type": "string"},
                           endpoints_field: _ENDPOINTS}}}}


MONITOR_SCHEMAS = {"PodMonitor": _monitor_schema("podMetricsEndpoints"),
                   "ServiceMonitor": _monitor_schema("endpoints")}


# --- the manifests as such -------------------------------------------------------------------


def test_kustomizations_use_current_fields_only(rendered):
  files = sorted(K8S.rglob("kustomization.yaml"))
  assert len(files) == 6  # base, dev, gpu, the HPA, tensorboard and service-monitor components
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
          obj):
        problems.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
      continue
    try:
      kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
      problems.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
      problems.append(f"{name}: {e.message}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_role_runs_what_compose_runs(rendered, variant):
  objects, _ = rendered[variant]
  compose, compose_gpu = compose_file(), compose_file("docker-compose.gpu.yml")
  for role in ROLES:
    c, service = container(objects, role), compose["services"][role]
    # No `command`: the image's entrypoint (`dqnfleet`) runs, with compose's command as args.
    assert "command" not in c and c["args"] == service["command"], role
    image = compose_default((compose_gpu["services"] if variant == "gpu" and role == "trainer"
                             else compose["services"])[role]["image"])
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
      expected = ({"port": health_port, "service": "readiness"} if probe == "readinessProbe"
                  else {"port": health_port})
      assert c[probe]["grpc"] == expected, f"{role} {probe}"
      assert c[probe].get("timeoutSeconds", 1) < c[probe].get("periodSeconds", 10)
    spec = workload(objects, role)["spec"]
    assert spec["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= 30


def tensorboard_logdir(argv: list[str]) -> str:
  """The --logdir of a `tensorboard ...` command line."""
  assert argv[0] == "tensorboard", argv
  (logdir,) = [a.partition("=")[2] for a in argv[1:] if a.startswith("--logdir=")]
  return logdir


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
    (name, _, *mode) = max((m for m in mounts if path == m[1] or path.startswith(m[1] + "/")),
                           key=lambda m: len(m[1]))
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_are_compose_variables_and_real_settings(rendered, variant, monkeypatch):
  objects, _ = rendered[variant]
  compose = compose_file()
  all_settings = {env_name(f) for cls in vars(config_module).values()
                  if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}
  for role in ROLES:
    c = container(objects, role)
    # Generated with a content hash, so a changed setting rolls the pods.
    for source in c["envFrom"]:
      assert re.fullmatch(r"dqnfleet-[a-z]+-[a-z0-9]{10}", source["configMapRef"]["name"])
    keys = set(configmap_data(objects, c))
    # Exactly the variables compose passes to this role: the same names, and
    # every setting compose exposes can be set here too.
    assert keys == set(compose["services"][role]["environment"]), role
    names = keys | {v["name"] for v in c.get("env", []) if v["name"].startswith(ENV_PREFIX)}
    assert names <= all_settings and names <= role_settings(role), names - role_settings(role)
    # A variable for a setting the args also set would be silently ignored.
    flags = {"--" + name[len(ENV_PREFIX):].lower().replace("_", "-") for name in names}
    assert not flags & set(flag_values(c["args"])), role
    # The values are valid: the service would start with them, not exit with a ConfigError.
    for name in list(os.environ):
      if name.startswith(ENV_PREFIX):
        monkeypatch.delenv(name)
    for name, value in pod_env(objects, c, f"{role}-0").items():
      monkeypatch.setenv(name, value)
    build_configs(SERVICE_GROUPS[role], build_parser().parse_args(c["args"]))
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
  # the shared ConfigMap is not its (its DQNFLEET_STICKY_ACTIONS is the
  # evaluation protocol's, in its own ConfigMap).
  assert not [s for s in container(objects, "evaluator")["envFrom"]
              if s["configMapRef"]["name"].startswith("dqnfleet-shared-")]


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
  # Every host:port in the args names a Service port: `replay:8000`, `trainer:8010`.
  for role in ROLES:
    for value in flag_values(container(objects, role)["args"]).values():
      if m := re.fullmatch(r"([a-z0-9-]+):(\d+)", value):
        assert int(m[2]) in {p["port"] for p in services[m[1]]["spec"]["ports"]}, value

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
  expected = {("replay", 8000): {"collector", "trainer"}, ("replay", 8001): {None},
              ("trainer", 8010): {"collector", "evaluator"}, ("collector", 8020): {None},
              ("evaluator", 8030): {None}}
  expected |= {(role, port): {"cluster"} for role, port in DEFAULT_METRICS_PORTS.items()}
  if board:
    expected[("tensorboard", 6006)] = {None}
  assert allowed == expected

  budgets = {n: b["spec"] for n, b in by_kind(objects, "PodDisruptionBudget").items()}
  assert set(budgets) == set(ROLES)  # TensorBoard is disposable: drains may always evict it
  for role in ROLES:
    assert selected(budgets[role]["selector"]["matchLabels"]) == {role}
  # Singletons: drains may evict them (0 would block drains forever).
  for role in ("replay", "trainer", "evaluator"):
    assert workload(objects, role)["spec"]["replicas"] == 1, role
    assert budgets[role]["maxUnavailable"] == 1, role
  assert budgets["collector"]["maxUnavailable"] == "50%"


def assert_locked_down_and_sized(pod: dict, c: dict, name: str) -> None:
  """What every pod of the fleet has: non-root, read-only, no token, requests and limits."""
  # These at least (fsGroupChangePolicy may come with them).
  assert pod["securityContext"] == {**pod["securityContext"], "runAsNonRoot": True,
                                    "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}}, name
  assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                  "readOnlyRootFilesystem": True,
                                  "capabilities": {"drop": ["ALL"]}}, name
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
    templates = {t["metadata"]["name"] for t in workload(objects, role)["spec"].get(
        "volumeClaimTemplates", [])}
    standalone = {name: volumes[name]["persistentVolumeClaim"]["claimName"]
                  for name in mounts.values() if "persistentVolumeClaim" in volumes.get(name, {})}
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
  assert ids == [{"name": "DQNFLEET_COLLECTOR_ID",
                  "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
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
  assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                           "name": "collector"}
  assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
  assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] < 256


# --- metrics and TensorBoard ------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*VARIANTS, *COMPOSED])
def test_every_pod_serves_metrics_where_prometheus_looks(rendered, variant, monkeypatch):
  """The port a service opens, as it reads its args and DQNFLEET_* variables, is
  its pod's `metrics` port and the one its prometheus.io/* annotations name."""
  objects, _ = rendered[variant]
  for role in ROLES:
    template = workload(objects, role)["spec"]["template"]
    c = container(objects, role)
    for name in list(os.environ):
      if name.startswith(ENV_PREFIX):
        monkeypatch.delenv(name)
    for name, value in pod_env(objects, c, f"{role}-0").items():
      monkeypatch.setenv(name, value)
    configs = build_configs(SERVICE_GROUPS[role], build_parser().parse_args(c["args"]))
    (opened,) = [group.metrics_port for group in configs if hasattr(group, "metrics_port")]
    # The defaults, which compose's prometheus.yml scrapes too (tests/test_monitoring.py).
    assert opened == DEFAULT_METRICS_PORTS[role], role
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [opened], role
    annotations = {k: v for k, v in template["metadata"].get("annotations", {}).items()
                   if k.startswith("prometheus.io/")}
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(opened),
                           "prometheus.io/path": "/metrics"}, role


def test_the_monitors_scrape_every_role_once_at_its_metrics_port(rendered):
  """The service-monitor component: replay and trainer through their Services,
  collectors (no Service, any number) and the evaluator as pods."""
  objects, _ = rendered["monitoring"]
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}
  templates["tensorboard"] = tensorboard(objects)["spec"]["template"]  # must not be scraped
  services = by_kind(objects, "Service")
  interval = yaml.safe_load((ROOT / "deploy/monitoring/prometheus.yml").read_text())["global"][
      "scrape_interval"]
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
        scraped.append((role, named.get(port["targetPort"], port["targetPort"]),
                        endpoint.get("path", "/metrics"), "service"))
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
      for role, port in DEFAULT_METRICS_PORTS.items())
  for monitor in [*by_kind(objects, "ServiceMonitor").values(),
                  *by_kind(objects, "PodMonitor").values()]:
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
      claim["metadata"]["name"]]
  assert logdir.startswith(trainer_path + "/")
  mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
  volumes = {v["name"]: v for v in pod["volumes"]}
  assert set(mounts) == {trainer_path, "/tmp"}
  assert mounts[trainer_path].get("readOnly") is True
  # A StatefulSet's claims are named <template>-<StatefulSet>-<ordinal>.
  assert volumes[mounts[trainer_path]["name"]]["persistentVolumeClaim"] == {
      "claimName": f"{claim['metadata']['name']}-{trainer['metadata']['name']}-0",
      "readOnly": True}
  assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
  (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
  assert term["topologyKey"] == "kubernetes.io/hostname"
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}
  assert selected_pods(templates, term["labelSelector"]) == {"trainer"}
  # One pod, the old one gone before the new one mounts the claim.
  assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}


# --- the dev overlay, run ----------------------------------------------------------------------


@dataclasses.dataclass
class LocalPod:
  """One pod of the rendered dev overlay, to be run as a local process."""
  name: str                 # the name Kubernetes would give it (replay-0, ...)
  role: str
  container: dict
  spec: dict                # the pod spec
  labels: dict
  ports: dict = dataclasses.field(default_factory=dict)   # containerPort -> local port
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
        directory = (root / "claims" / claim["claimName"] if claim
                     else root / name / mount["name"])
        directory.mkdir(parents=True, exist_ok=claim is not None)
        pod.mounts[mount["mountPath"]] = directory
      pods.append(pod)
  return pods


def service_address(objects: list[dict], pods: list[LocalPod], host: str, port: int) -> str:
  """What `host:port` reaches in the cluster (Service -> its one pod), on loopback."""
  service = by_kind(objects, "Service")[host]["spec"]
  (target,) = [p for p in pods if service["selector"].items() <= p.labels.items()]
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
  services = by_kind(objects, "Service")
  args = [pod.container["args"][0]]
  for flag, value in flag_values(pod.container["args"]).items():
    address = re.fullmatch(r"([a-z0-9-]+):(\d+)", value)
    mount = next((m for m in pod.mounts if value == m or value.startswith(m + "/")), None)
    if address and address[1] in services:
      value = service_address(objects, pods, address[1], int(address[2]))
    elif flag.endswith("port") and int(value) in pod.ports:
      value = str(pod.ports[int(value)])
    elif mount:
      value = str(pod.mounts[mount]) + value[len(mount):]
    args.append(f"{flag}={value}")
  return args


def local_env(objects: list[dict], pod: LocalPod) -> dict[str, str]:
  env = {name: "" for name in os.environ if name.startswith(ENV_PREFIX)}  # empty = default
  env.update(pod_env(objects, pod.container, pod.name))
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
    started[pod.name] = services(pod.name, *args, env=local_env(objects, pod))
  by_role = {role: [p for p in pods if p.role == role] for role in ROLES}
  (replay,), (trainer,), (evaluator,) = by_role["replay"], by_role["trainer"], by_role["evaluator"]
  peak_rss = {p.name: 0 for p in pods}

  def status(pod: LocalPod):
    peak_rss[pod.name] = max(peak_rss[pod.name],
                             psutil.Process(started[pod.name].proc.pid).memory_info().rss)
    return rpc.get_status(health_address(pod), timeout=5)

  def alive():
    """Fails at once if a service died (wait_until would retry an assertion until its timeout)."""
    for name, service in started.items():
      if service.proc.poll() is not None:
        pytest.fail(f"{name} exited with {service.proc.returncode}:\n{service.log()[-3000:]}")
    return True

  # What the startup probes wait for: every pod's health port answers SERVING.
  for pod in pods:
    wait_until(lambda: alive() and rpc.check_health(health_address(pod)), 240,
               f"{pod.name} to answer its health probe", interval=2)
  min_size = int(configmap_data(objects, replay.container)["DQNFLEET_MIN_SIZE"])
  wait_until(lambda: alive() and status(replay).replay_size >= min_size, 180,
             "replay to fill to the dev overlay's min size", interval=2)
  wait_until(lambda: alive() and status(trainer).counters["train_steps"] > 0, 180,
             "the trainer to train", interval=2)
  reports = {}
  for pod in by_role["collector"]:
    reports[pod.name] = wait_until(lambda: alive() and (s := status(pod)).policy_version > 0 and s,
                                   180, f"{pod.name} to act with a published policy", interval=2)
  # Each replica its own id (the pod name, from the downward API) and seed.
  assert {r.id for r in reports.values()} == set(reports)
  assert len({r.counters["seed"] for r in reports.values()}) == len(reports)
  # The evaluator evaluates the first version it receives at once (later ones
  # every DQNFLEET_EVERY_MINUTES) and reports the result.
  evaluation = wait_until(
      lambda: alive() and (s := status(evaluator)).counters["evaluations"] >= 1 and s, 240,
      "the evaluator's first evaluation", interval=2)
  assert evaluation.role == "evaluator" and evaluation.policy_version >= 0
  # Each pod serves, where its annotations tell Prometheus to look, the
  # metrics the Grafana dashboard may use (tests/test_monitoring.py).
  for pod in pods:
    annotations = workload(objects, pod.role)["spec"]["template"]["metadata"]["annotations"]
    url = (f"http://localhost:{pod.ports[int(annotations['prometheus.io/port'])]}"
           f"{annotations['prometheus.io/path']}")
    families = list(text_string_to_metric_families(
        urllib.request.urlopen(url, timeout=10).read().decode()))
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
      tensorboard(objects)["spec"]["template"]["spec"]["containers"][0]["command"])
  local_logdir = trainer.mounts[trainer_mount] / pathlib.PurePosixPath(logdir).relative_to(
      trainer_mount)
  for run in ("trainer", "collectors", "evaluator"):
    wait_until(lambda: alive() and list((local_logdir / run).rglob("events.out.tfevents.*")), 120,
               f"{run} summaries in the trainer's logdir", interval=2)
  for pod in pods:
    status(pod)
  print("peak resident memory (MiB):", {n: round(r / 2**20) for n, r in peak_rss.items()})

  # SIGTERM, as the kubelet stops a pod, within its grace period; replay
  # writes its checkpoint and the trainer its own, both to their volumes.
  for role in ("evaluator", "collector", "trainer", "replay"):
    for pod in by_role[role]:
      grace = pod.spec.get("terminationGracePeriodSeconds", 30)
      assert started[pod.name].stop(timeout=grace) == 0, started[pod.name].log()[-3000:]
  (replay_dir,) = [d for m, d in replay.mounts.items() if m != "/tmp"]
  (trainer_dir,) = [d for m, d in trainer.mounts.items() if m != "/tmp"]
  assert any(replay_dir.iterdir()), "no replay checkpoint on the replay volume"
  assert any((trainer_dir / "checkpoints").iterdir()) and any((trainer_dir / "policies").iterdir())
  # The evaluator's results are on its own (standalone) claim.
  (evaluator_dir,) = [d for m, d in evaluator.mounts.items() if m != "/tmp"]
  history = (evaluator_dir / "history.jsonl").read_text().splitlines()
  assert len(history) >= evaluation.counters["evaluations"]
  # The dev overlay's memory limits leave room above what the processes used here.
  for pod in pods:
    limit = quantity(pod.container["resources"]["limits"]["memory"])
    assert peak_rss[pod.name] < 0.75 * limit, (pod.name, peak_rss[pod.name], limit)
