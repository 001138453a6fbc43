"""The Kubernetes manifests (deploy/k8s): valid, in step with docker-compose.yml
and the settings, and runnable.

Every overlay is rendered with `kubectl kustomize` and validated offline,
strictly, against the Kubernetes OpenAPI schemas that `kubernetes-validate`
ships. The last test runs the dev overlay's pods as local processes (their
args and settings, read from the rendered manifests) and checks that the fleet
trains and the evaluator evaluates. Needs `kubectl` and the `kubernetes-validate`
package: outside CI the tests that need them are skipped without them, in CI
(CI=true) they fail.
"""
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess

import psutil
import pytest
import yaml

from dqnfleet.cli.main import SERVICE_GROUPS, build_configs, build_parser
from dqnfleet.core import config as config_module
from dqnfleet.core import rpc
from dqnfleet.core.settings import ENV_PREFIX, env_name

from conftest import free_port, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
HPA_COMPONENT = K8S / "components" / "collector-hpa"
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
# Args that differ from compose's command on purpose. Compose writes the
# evaluator's TensorBoard summaries into the trainer's volume, under the logdir
# of its tensorboard profile; on Kubernetes the evaluator shares no volume with
# the trainer and keeps them on its own.
K8S_ARGS = {"evaluator": {"--summary-dir": "/data/evaluator/tensorboard"}}


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
  """Each variant's objects; "hpa" is the dev overlay plus the HPA component.

  A component cannot be rendered alone, so "hpa" is a throwaway overlay in a
  temporary directory (kustomize accepts only relative paths to other roots).
  """
  if not shutil.which("kubectl"):
    required("kubectl (to render deploy/k8s)")
  out = {name: kustomize(path) for name, path in VARIANTS.items()}
  overlay = tmp_path_factory.mktemp("hpa-overlay")
  (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
      "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
      "resources": [os.path.relpath(VARIANTS["dev"], overlay)],
      "components": [os.path.relpath(HPA_COMPONENT, overlay)]}))
  out["hpa"] = kustomize(overlay)
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


# --- the manifests as such -------------------------------------------------------------------


def test_kustomizations_use_current_fields_only(rendered):
  files = sorted(K8S.rglob("kustomization.yaml"))
  assert len(files) == 4  # base, dev, gpu, the HPA component
  for path in files:
    fields = set(yaml.safe_load(path.read_text()))
    assert not fields & DEPRECATED_FIELDS, f"{path.relative_to(ROOT)}: {fields & DEPRECATED_FIELDS}"
  for name, (_, warnings) in rendered.items():
    assert "deprecated" not in warnings.lower(), f"{name}: {warnings}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", [*VARIANTS, "hpa"])
def test_rendered_objects_are_valid_kubernetes_objects(rendered, variant, version):
  """Strict: an unknown or misspelt field is an error, as are kinds without a schema."""
  try:
    import kubernetes_validate  # the schemas, offline; pinned in requirements.lock
  except ImportError:
    required("kubernetes-validate (pip)")
  objects, _ = rendered[variant]
  problems = []
  for obj in objects:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
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
    # No `command`: the image's entrypoint (`dqnfleet`) runs, with compose's command as args
    # (but for the flags K8S_ARGS sets, in the same place).
    expected = [service["command"][0]] + [
        f"{flag}={K8S_ARGS.get(role, {}).get(flag, value)}"
        for flag, value in flag_values(service["command"]).items()]
    assert "command" not in c and c["args"] == expected, role
    assert set(K8S_ARGS.get(role, {})) <= set(flag_values(service["command"])), role
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
    for probe in PROBES:
      assert c[probe]["grpc"] == {"port": health_port}, f"{role} {probe}"
      assert c[probe].get("timeoutSeconds", 1) < c[probe].get("periodSeconds", 10)
    spec = workload(objects, role)["spec"]
    assert spec["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= 30


def test_compose_puts_the_evaluators_summaries_where_its_tensorboard_looks():
  """The one reason compose's args differ from the pod's (K8S_ARGS): see docker-compose.yml."""
  services = compose_file()["services"]
  evaluator, tensorboard = services["evaluator"], services["tensorboard"]
  assert evaluator["profiles"] == ["evaluator"]
  (logdir,) = [a.partition("=")[2] for a in tensorboard["entrypoint"] if a.startswith("--logdir=")]
  summary_dir = flag_values(evaluator["command"])["--summary-dir"]
  assert summary_dir.startswith(logdir + "/"), (summary_dir, logdir)

  def volume(service: dict, path: str) -> tuple[str, str]:
    """The named volume holding `path` in a service, and the mount's mode ("rw" or "ro")."""
    mounts = [v.split(":") for v in service["volumes"]]
    (name, _, *mode) = max((m for m in mounts if path == m[1] or path.startswith(m[1] + "/")),
                                key=lambda m: len(m[1]))
    return name, (mode or ["rw"])[0]

  assert volume(evaluator, summary_dir) == (volume(tensorboard, logdir)[0], "rw")
  assert volume(evaluator, summary_dir)[0] == volume(services["trainer"], logdir)[0]
  out_dir = flag_values(evaluator["command"])["--out-dir"]
  assert volume(evaluator, out_dir) == ("evaluator-data", "rw")
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_policies_and_budgets_select_the_right_pods(rendered, variant):
  objects, _ = rendered[variant]
  templates = {role: workload(objects, role)["spec"]["template"] for role in ROLES}

  def selected(match_labels: dict) -> set[str]:
    return {role for role, t in templates.items()
            if match_labels.items() <= t["metadata"]["labels"].items()}

  for role in ROLES:
    assert selected(workload(objects, role)["spec"]["selector"]["matchLabels"]) == {role}
  services = by_kind(objects, "Service")
  assert set(services) == {"replay", "trainer"}  # nothing connects to a collector
  for name, service in services.items():
    assert selected(service["spec"]["selector"]) == {name}
    assert workload(objects, name)["spec"]["serviceName"] == name
    c = container(objects, name)
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The same numbers as in the pod, so `replay:8001` means what it means in compose.
    ports = [named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]]
    assert ports == [p["port"] for p in service["spec"]["ports"]]
    assert sorted(ports) == sorted(opened_ports(c["args"])), name
  # Every host:port in the args names a Service port: `replay:8000`, `trainer:8010`.
  for role in ROLES:
    for value in flag_values(container(objects, role)["args"]).values():
      if m := re.fullmatch(r"([a-z0-9-]+):(\d+)", value):
        assert int(m[2]) in {p["port"] for p in services[m[1]]["spec"]["ports"]}, value

  policies = {n: p["spec"] for n, p in by_kind(objects, "NetworkPolicy").items()}
  allowed = {}  # (target role, port) -> roles allowed in (None: any pod of the namespace)
  for spec in policies.values():
    (target,) = selected(spec["podSelector"]["matchLabels"])
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
      sources = set()
      for peer in rule["from"]:
        labels = peer["podSelector"].get("matchLabels")
        sources |= selected(labels) if labels else {None}
      for port in rule["ports"]:
        assert port["port"] in opened_ports(container(objects, target)["args"])
        allowed[(target, port["port"])] = sources
  assert allowed == {("replay", 8000): {"collector", "trainer"}, ("replay", 8001): {None},
                     ("trainer", 8010): {"collector", "evaluator"}, ("collector", 8020): {None},
                     ("evaluator", 8030): {None}}

  budgets = {n: b["spec"] for n, b in by_kind(objects, "PodDisruptionBudget").items()}
  for role in ROLES:
    assert selected(budgets[role]["selector"]["matchLabels"]) == {role}
  # Singletons: drains may evict them (0 would block drains forever).
  for role in ("replay", "trainer", "evaluator"):
    assert workload(objects, role)["spec"]["replicas"] == 1, role
    assert budgets[role]["maxUnavailable"] == 1, role
  assert budgets["collector"]["maxUnavailable"] == "50%"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_locked_down_and_sized(rendered, variant):
  objects, _ = rendered[variant]
  claims = by_kind(objects, "PersistentVolumeClaim")
  claimed = set()
  for role in ROLES:
    pod = workload(objects, role)["spec"]["template"]["spec"]
    c = container(objects, role)
    # These at least (fsGroupChangePolicy may come with them).
    assert pod["securityContext"] == {**pod["securityContext"], "runAsNonRoot": True,
                                      "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert pod["enableServiceLinks"] is False  # no injected *_PORT variables next to the settings
    assert pod["automountServiceAccountToken"] is False
    for kind in ("cpu", "memory"):
      request, limit = (quantity(c["resources"][k][kind]) for k in ("requests", "limits"))
      assert 0 < request <= limit, f"{role} {kind}"
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
  # The evaluator's results and summaries are on its own (standalone) claim.
  (evaluator_dir,) = [d for m, d in evaluator.mounts.items() if m != "/tmp"]
  history = (evaluator_dir / "history.jsonl").read_text().splitlines()
  assert len(history) >= evaluation.counters["evaluations"]
  assert list((evaluator_dir / "tensorboard").glob("events.out.tfevents.*"))
  # The dev overlay's memory limits leave room above what the processes used here.
  for pod in pods:
    limit = quantity(pod.container["resources"]["limits"]["memory"])
    assert peak_rss[pod.name] < 0.75 * limit, (pod.name, peak_rss[pod.name], limit)
