"""The trainer's policy API: publishes versions and serves them to collectors.

Versions are written to <run_dir>/policies (core/policy_store.py) and served
over PolicyService: collectors watch for new versions and fetch their files in
chunks, so they need no filesystem shared with the trainer.
"""
import logging
import os
import shutil
import threading

import grpc

from dqnfleet.core import metrics, policy_store
from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
WATCH_POLL_S = 1.0

VERSION = metrics.gauge("trainer_policy_version", "Newest published policy version (train step).")
PUBLISHES = metrics.counter("trainer_publishes", "Policy versions published by this process.")
POLICY_BYTES = metrics.gauge("trainer_policy_bytes", "Size of the newest published version.")
WATCHERS = metrics.gauge("trainer_policy_watchers",
                         "Open WatchPolicies streams (collectors and evaluators following).")


class PolicyPublisher(fleet_pb2_grpc.PolicyServiceServicer):
  """Writes new versions and answers PolicyService calls about them."""

  def __init__(self, policies_dir: str, env_config, network_config, keep: int):
    self.dir = policies_dir
    self._env, self._net, self._keep = env_config, network_config, keep
    self._changed = threading.Condition()
    self._latest: fleet_pb2.PolicyVersion | None = None
    # A restarted trainer goes on serving what it published before, once it
    # has checked it: a version damaged on disk is moved aside, never served.
    for version in reversed(policy_store.list_versions(policies_dir)):
      path = policy_store.version_dir(policies_dir, version)
      problem = policy_store.damage(path)
      if problem is None:
        self._announce(version)
        break
      aside = path.with_name(f".damaged-{path.name}")
      shutil.rmtree(aside, ignore_errors=True)
      os.rename(path, aside)
      log.warning("published policy v%d is damaged (%s): moved aside to %s, not served",
                  version, problem, aside)

  @property
  def latest_version(self) -> int:
    latest = self._latest
    return latest.version if latest else -1

  def publish(self, version: int, network) -> None:
    if version <= self.latest_version:
      # Resumed from a checkpoint older than the newest published version (a
      # crash between the two): announcing it would send collectors back.
      log.info("not publishing v%d: v%d, published before the restart, stays the newest until "
               "training passes it", version, self.latest_version)
      return
    policy_store.publish(self.dir, version, network, self._env, self._net, self._keep)
    self._announce(version)
    PUBLISHES.inc()

  def _announce(self, version: int) -> None:
    path = policy_store.version_dir(self.dir, version)
    manifest = policy_store.read_manifest(path)
    info = fleet_pb2.PolicyVersion(
        version=version, published_unix_ms=manifest["published_unix_ms"],
        files=[fleet_pb2.PolicyFile(name=n, size_bytes=s, sha256=h)
               for n, s, h in policy_store.file_digests(path)])
    with self._changed:
      self._latest = info
      self._changed.notify_all()
    VERSION.set(version)
    POLICY_BYTES.set(sum(f.size_bytes for f in info.files))

  def GetLatestPolicy(self, request, context):
    if self._latest is None:
      context.abort(grpc.StatusCode.NOT_FOUND, "no policy has been published yet")
    return self._latest

  def WatchPolicies(self, request, context):
    last = request.after_version
    WATCHERS.inc()
    try:
      while context.is_active():
        with self._changed:
          self._changed.wait_for(
              lambda: self._latest is not None and self._latest.version > last,
              timeout=WATCH_POLL_S)
          latest = self._latest
        if latest is not None and latest.version > last:
          last = latest.version
          yield latest
    finally:
      WATCHERS.dec()

  def FetchPolicy(self, request, context):
    chunk_bytes = request.max_chunk_bytes or CHUNK_BYTES
    path = policy_store.version_dir(self.dir, request.version)
    try:
      files = sorted(p for p in path.iterdir())
      for file in files:
        with open(file, "rb") as f:
          offset = 0
          while data := f.read(chunk_bytes):
            yield fleet_pb2.PolicyChunk(file_name=file.name, offset=offset, data=data)
            offset += len(data)
    except FileNotFoundError:
      kept = policy_store.list_versions(self.dir)
      context.abort(grpc.StatusCode.NOT_FOUND,
                    f"policy v{request.version} is not kept; kept versions: {kept}")
