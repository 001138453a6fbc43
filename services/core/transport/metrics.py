"""Prometheus metrics: each service process serves /metrics on a port of its own.

Metric objects are module-level in each service (one process, one service),
named `dqnfleet_<role>_<what>` with Prometheus units: `_total` counters,
seconds, bytes. Values another process owns (the replay table's counters)
are read when Prometheus scrapes, through `ScrapeTimeCollector`, so they are
never stale and cost nothing between scrapes.
"""

import logging
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dqnfleet.core.settings.config import METRICS_OFF
from dqnfleet.core.transport.rpc import PortUnavailable

log = logging.getLogger(__name__)
PREFIX = "dqnfleet_"

BUILD_INFO = prometheus_client.Gauge(
  PREFIX + "build_info",
  "The dqnfleet version and git revision this process runs (always 1).",
  ["version", "git_revision", "role"],
)


def counter(name: str, help: str, labels: Iterable[str] = ()) -> prometheus_client.Counter:
  # prometheus_client appends `_total` to counters itself.
  return prometheus_client.Counter(PREFIX + name, help, list(labels))


def gauge(name: str, help: str, labels: Iterable[str] = ()) -> prometheus_client.Gauge:
  return prometheus_client.Gauge(PREFIX + name, help, list(labels))


def histogram(name: str, help: str, buckets: Iterable[float]) -> prometheus_client.Histogram:
  return prometheus_client.Histogram(PREFIX + name, help, buckets=list(buckets))


class ScrapeTimeCollector(Collector):
  """Metrics computed when Prometheus scrapes, by `read` -> {name: (kind, help, value)}.

  `kind` is "counter" or "gauge". A read that fails (the peer is down)
  yields nothing for that scrape, so Prometheus shows a gap instead of a
  made-up value.
  """

  def __init__(self, read: Callable[[], dict[str, tuple[str, str, float]]]):
    self._read = read

  def collect(self):
    try:
      values = self._read()
    except Exception as e:  # a scrape must not fail because a peer is down
      log.debug("metrics not read at this scrape: %s", e)
      return
    for name, (kind, help, value) in values.items():
      family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
      yield family(PREFIX + name, help, value=value)


def register(collector: Collector) -> None:
  prometheus_client.REGISTRY.register(collector)


def serve(
  port: int, role: str, version: str, git_revision: str, listen_host: str = "::"
) -> int | None:
  """Starts the /metrics endpoint on `port` (0: any free one) at `listen_host`; returns the port.

  METRICS_OFF (-1) starts nothing and returns None. A port in use stops the
  service with an error that names it, like the other ports.
  """
  BUILD_INFO.labels(version=version, git_revision=git_revision or "unknown", role=role).set(1)
  if port == METRICS_OFF:
    return None
  try:
    # "::" is every interface to gRPC, which falls back to IPv4 where a
    # container has no IPv6; the HTTP server would fail there instead.
    server, _ = prometheus_client.start_http_server(
      port, addr="0.0.0.0" if listen_host == "::" else listen_host
    )
  except OSError as e:
    raise PortUnavailable(
      f"cannot serve metrics on port {port} ({e.strerror}): use "
      "--metrics-port to pick another port, 0 for any free one or -1 for "
      "none"
    ) from None
  bound = server.server_port
  log.info("Prometheus metrics on port %d (/metrics)", bound)
  return bound
