"""Prometheus and Grafana for the compose fleet (deploy/monitoring, profile
`monitoring` of docker-compose.yml): they scrape what the services serve and
show only metrics the services export.

Offline and fast: the files are parsed and cross-checked with
docker-compose.yml and the settings' default ports, and `docker compose config`
(Compose v2 and docker-compose v1.29, where installed) renders the profile.
Nothing is pulled or started. The Kubernetes side (annotations, the
service-monitor and tensorboard components) is checked in tests/test_k8s_manifests.py
and tests/test_deploy_agreement.py.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from support import (
  DEFAULT_METRICS_PORTS,
  METRICS,
  ROLES,
  ROOT,
  compose_config,
  compose_file,
  flag_values,
)

MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "dqnfleet.json"
# What the dashboard may show: the services' metrics (support.METRICS) and the
# series Prometheus stores for their histograms.
HISTOGRAMS = {"dqnfleet_collector_episode_return"}
EXPORTED = set().union(*METRICS.values()) | {
  f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# PromQL's words that are not metric names: functions, aggregations, modifiers.
PROMQL_WORDS = {
  "sum",
  "avg",
  "min",
  "max",
  "count",
  "topk",
  "bottomk",
  "quantile",
  "stddev",
  "stdvar",
  "group",
  "by",
  "without",
  "on",
  "ignoring",
  "group_left",
  "group_right",
  "and",
  "or",
  "unless",
  "bool",
  "offset",
  "rate",
  "irate",
  "increase",
  "delta",
  "idelta",
  "deriv",
  "histogram_quantile",
  "avg_over_time",
  "max_over_time",
  "min_over_time",
  "sum_over_time",
  "last_over_time",
  "clamp_min",
  "clamp_max",
  "abs",
  "time",
  "timestamp",
  "vector",
  "scalar",
  "label_replace",
  "absent",
  "resets",
  "changes",
}


def metric_names(expr: str) -> set[str]:
  """The metric names a PromQL expression reads.

  Drops string literals, label matchers {...}, range and subquery selectors
  [...] and the label lists of by/without/on/ignoring/group_left/group_right;
  what is left that is not a number or one of PROMQL_WORDS names a metric.
  """
  expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
  expr = re.sub(r"\{[^}]*\}", "", expr)
  expr = re.sub(r"\[[^\]]*\]", "", expr)
  expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
  words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r"\b\d+(\.\d+)?(e\d+)?\b", "", expr)))
  return words - PROMQL_WORDS


def dashboard_targets() -> list[tuple[str, dict]]:
  panels = json.loads(DASHBOARD.read_text())["panels"]
  return [(p["title"], t) for p in panels if p["type"] != "row" for t in p["targets"]]


# --- Prometheus ----------------------------------------------------------------------------------


def test_compose_services_serve_metrics_on_the_default_ports_inside_the_network():
  services = compose_file()["services"]
  for role in ROLES:
    assert flag_values(services[role]["command"])["--metrics-port"] == str(
      DEFAULT_METRICS_PORTS[role]
    ), role
    # Only Prometheus reads them, on the compose network: no host ports.
    assert "ports" not in services[role], role


def test_prometheus_scrapes_every_service_at_its_metrics_port():
  prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
  services = compose_file()["services"]
  scraped = {}  # compose service -> port
  for job in prometheus["scrape_configs"]:
    assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
    assert set(job) <= {"job_name", "static_configs", "dns_sd_configs"}, job["job_name"]
    targets = []  # (host, port)
    for static in job.get("static_configs", []):
      targets += [(host, int(port)) for host, port in (t.rsplit(":", 1) for t in static["targets"])]
    for sd in job.get("dns_sd_configs", []):
      # One A record per container of a scaled service (Docker's DNS), each a target.
      assert sd["type"] == "A", job["job_name"]
      targets += [(name, sd["port"]) for name in sd["names"]]
    # One service per job, named after it (as the service-monitor component names jobs).
    assert {host for host, _ in targets} == {job["job_name"]}, targets
    assert job["job_name"] not in scraped, job["job_name"]
    (scraped[job["job_name"]],) = {port for _, port in targets}
  assert scraped == DEFAULT_METRICS_PORTS
  assert set(scraped) <= set(services)
  # Collectors scale: they must be found by DNS, not listed.
  (collector_job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "collector"]
  assert "static_configs" not in collector_job and collector_job["dns_sd_configs"]
  # The dashboard's rate(...[1m]) needs at least two samples a minute.
  interval = prometheus["global"]["scrape_interval"]
  assert re.fullmatch(r"\d+s", interval) and int(interval[:-1]) <= 30


def test_the_monitoring_profile_mounts_these_files():
  services = compose_file()["services"]
  prometheus, grafana = services["prometheus"], services["grafana"]
  for service in (prometheus, grafana):
    assert service["profiles"] == ["monitoring"]
    # Pinned, so that the provisioning format does not change under it.
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), service["image"]

  def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's bind mounts (short syntax)."""
    out = {}
    for volume in service["volumes"]:
      source, target, *mode = volume.split(":")
      if source.startswith("./"):
        out[target] = (source, (mode or ["rw"])[0])
    return out

  assert mounts(prometheus) == {
    "/etc/prometheus/prometheus.yml": ("./deploy/monitoring/prometheus.yml", "ro")
  }
  grafana_mounts = mounts(grafana)
  for source, mode in grafana_mounts.values():
    assert mode == "ro" and (ROOT / source).is_dir(), source
  datasources = yaml.safe_load(
    (MONITORING / "grafana" / "datasources" / "prometheus.yaml").read_text()
  )
  providers = yaml.safe_load((MONITORING / "grafana" / "dashboards" / "dqnfleet.yaml").read_text())
  assert grafana_mounts == {
    "/etc/grafana/provisioning/datasources": ("./deploy/monitoring/grafana/datasources", "ro"),
    "/etc/grafana/provisioning/dashboards": ("./deploy/monitoring/grafana/dashboards", "ro"),
  }
  # The datasource is compose's prometheus service at its container port.
  (source,) = datasources["datasources"]
  assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
  assert any(p.endswith(":9090") for p in prometheus["ports"])
  # The provider reads the mounted directory, where dqnfleet.json is; so does the home page.
  (provider,) = providers["providers"]
  home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
  assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"
  assert home == f"{provider['options']['path']}/{DASHBOARD.name}" and DASHBOARD.is_file()


def compose_flavours() -> list[tuple[str, list[str]]]:
  return [("v2", ["docker", "compose"]), ("v1", ["docker-compose"])]


@pytest.mark.parametrize("flavour,command", compose_flavours(), ids=["compose-v2", "compose-v1"])
def test_the_monitoring_profile_renders_in_compose(flavour, command):
  """`config` resolves the profile without pulling anything (and needs no engine)."""
  if not shutil.which(command[0]):
    if os.environ.get("CI"):
      pytest.fail(f"{' '.join(command)} is required in CI (../shared/tools/docker-engine)")
    pytest.skip(f"no {command[0]}")
  version = subprocess.run(
    [*command, "version", "--short"], capture_output=True, text=True, timeout=60
  )
  if version.returncode != 0:
    if os.environ.get("CI"):
      pytest.fail(f"{' '.join(command)} does not run: {version.stderr}")
    pytest.skip(f"{' '.join(command)} does not run")
  major = version.stdout.strip().lstrip("v").split(".")[0]
  if major != {"v2": "2", "v1": "1"}[flavour]:
    pytest.skip(f"{' '.join(command)} is Compose {version.stdout.strip()}, not {flavour}")
  services = compose_config(
    command, "-p", "dqnfleetmonitoring", "--profile", "monitoring", "--profile", "evaluator"
  )["services"]
  assert {"prometheus", "grafana", *ROLES} <= set(services)

  def published(service: dict) -> set[str]:
    return {
      str(p["published"]) if isinstance(p, dict) else p.split(":")[-2]
      for p in service.get("ports", [])
    }

  assert published(services["prometheus"]) == {"9090"}
  assert published(services["grafana"]) == {"3000"}
  for role in ROLES:
    assert not published(services[role]), role
  # Bind mounts resolve to files of this checkout, read-only.
  for name in ("prometheus", "grafana"):
    for volume in services[name]["volumes"]:
      if isinstance(volume, dict):  # Compose v2
        source, read_only = volume["source"], volume.get("read_only", False)
      else:  # v1: source:target[:mode]
        parts = volume.split(":")
        source, read_only = parts[0], parts[2:] == ["ro"]
      if source.startswith("/"):
        assert pathlib.Path(source).exists() and read_only, (name, volume)
        assert pathlib.Path(source).resolve().is_relative_to(MONITORING), (name, volume)


# --- Grafana -----------------------------------------------------------------------------------


def test_metric_names_are_read_from_promql():
  """The extractor the dashboard test relies on finds what it must flag."""
  assert metric_names(
    'sum by (le) (rate(dqnfleet_collector_episode_return_bucket{job="x"}[5m]))'
  ) == {"dqnfleet_collector_episode_return_bucket"}
  assert metric_names(
    "rate(process_cpu_seconds_total[1m]) * on (job, instance) group_left (role) dqnfleet_build_info"
  ) == {"process_cpu_seconds_total", "dqnfleet_build_info"}
  assert metric_names("up == 0") == {"up"}
  assert metric_names("histogram_quantile(0.9, rate(x_bucket[1m])) * 1e3") == {"x_bucket"}


def test_the_dashboard_shows_only_exported_metrics():
  dashboard = json.loads(DASHBOARD.read_text())
  assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
  used = set()
  for title, target in dashboard_targets():
    names = metric_names(target["expr"])
    assert names and names <= EXPORTED, (title, target["expr"], names - EXPORTED)
    used |= names
  # Something of every service and of each of the requested views.
  for role in ROLES:
    assert used & METRICS[role], role
  exprs = {t["expr"] for _, t in dashboard_targets()}
  for expr in (
    "rate(dqnfleet_trainer_train_steps_total[1m])",
    "sum(rate(dqnfleet_collector_env_steps_total[1m]))",
    "sum(rate(dqnfleet_collector_episode_return_sum[5m])) / "
    "sum(rate(dqnfleet_collector_episode_return_count[5m]))",
  ):
    assert expr in exprs, expr
  assert any(e.startswith("histogram_quantile(") for e in exprs)
  for name in (
    "dqnfleet_evaluator_return_mean",
    "dqnfleet_evaluator_return_max",
    "dqnfleet_replay_table_size",
    "dqnfleet_trainer_loss",
    "dqnfleet_trainer_mean_q",
    "dqnfleet_trainer_policy_lag_steps",
    "dqnfleet_trainer_policy_version",
    "dqnfleet_collector_policy_version",
    "dqnfleet_trainer_policy_watchers",
    "dqnfleet_replay_inserts_total",
    "dqnfleet_replay_samples_total",
    "dqnfleet_replay_insert_blocked_seconds_total",
    "dqnfleet_replay_sample_blocked_seconds_total",
  ):
    assert name in used, name


def test_the_dashboard_is_laid_out_and_uses_the_provisioned_datasource():
  dashboard = json.loads(DASHBOARD.read_text())
  (source,) = yaml.safe_load(
    (MONITORING / "grafana" / "datasources" / "prometheus.yaml").read_text()
  )["datasources"]
  # One datasource variable, defaulting to the provisioned one (another
  # Grafana offers its own Prometheus instead); every query goes through it.
  (variable,) = dashboard["templating"]["list"]
  assert variable["type"] == "datasource" and variable["query"] == source["type"]
  assert variable["current"]["value"] == source["uid"]
  reference = {"type": source["type"], "uid": "${" + variable["name"] + "}"}
  ids, cells = set(), set()
  for panel in dashboard["panels"]:
    assert panel["id"] not in ids, panel["title"]
    ids.add(panel["id"])
    grid = panel["gridPos"]
    assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values())
    assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    area = {
      (x, y)
      for x in range(grid["x"], grid["x"] + grid["w"])
      for y in range(grid["y"], grid["y"] + grid["h"])
    }
    assert not area & cells, f"{panel['title']} overlaps another panel"
    cells |= area
    if panel["type"] == "row":
      continue
    assert panel["datasource"] == reference, panel["title"]
    refs = [t["refId"] for t in panel["targets"]]
    assert refs and len(set(refs)) == len(refs), panel["title"]
    for target in panel["targets"]:
      assert target["datasource"] == reference and target["expr"].strip(), panel["title"]
