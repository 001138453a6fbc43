"""The trainer's policy API: publishes versions and serves them to collectors.

Versions are written to <run_dir>/policies (policy/store.py) and served
over PolicyService: collectors watch for new versions and fetch their files in
chunks, so they need no filesystem shared with the trainer.

WatchPolicies streams are coroutines on the trainer's gRPC event loop
(transport/rpc.py): a thousand watchers cost a thousand suspended coroutines, not
a thousand threads, and one publication wakes them all.

Every announcement is followed by a herd: each follower fetches the new
version at once. FetchPolicy is a coroutine too, serving bytes read once per
version, and a bounded number of downloads stream at a time. The rest wait
as suspended coroutines, so status and GetLatestPolicy, which run in the
server's thread pool, never queue behind the herd, and memory stays bounded.
"""

import asyncio
import logging

import grpc

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.policy import store
from dqnfleet.core.transport import metrics
from dqnfleet.core.transport.broadcast import Broadcast

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
# Downloads sending at once; the rest wait their turn. Measured with 1,000 Breakout
# followers (docs/scale.md): the herd takes as long with 1 as with 32, since one
# event loop does all the sending, but past 4 the loop stalls health checks and
# status calls for up to 2 s. A few keep the link busy across round trips.
CONCURRENT_FETCHES = 4
# Versions whose bytes stay in memory: the newest, and the one before it for
# followers still downloading it when the next is published.
CACHED_VERSIONS = 2

VERSION = metrics.gauge("trainer_policy_version", "Newest published policy version (train step).")
PUBLISHES = metrics.counter("trainer_publishes", "Policy versions published by this process.")
POLICY_BYTES = metrics.gauge("trainer_policy_bytes", "Size of the newest published version.")
WATCHERS = metrics.gauge(
  "trainer_policy_watchers", "Open WatchPolicies streams (collectors and evaluators following)."
)
FETCHES = metrics.gauge(
  "trainer_policy_fetches", "FetchPolicy downloads in progress, sending or waiting their turn."
)


class PolicyPublisher(fleet_pb2_grpc.PolicyServiceServicer):
  """Writes new versions and answers PolicyService calls about them."""

  def __init__(self, policies_dir: str, env_config, network_config, keep: int, td_target=None):
    """`td_target` (core/rl/priorities.py) travels in every version's manifest."""
    self.dir = policies_dir
    self._env, self._net, self._keep = env_config, network_config, keep
    self._td_target = td_target
    self._announced = Broadcast()
    self._latest: fleet_pb2.PolicyVersion | None = None
    # version -> Future of its files' bytes; only touched on the server's event loop.
    self._files: dict[int, asyncio.Future] = {}
    self._sending = asyncio.Semaphore(CONCURRENT_FETCHES)
    # A restarted trainer goes on serving what it published before, once it
    # has checked it: a version damaged on disk is moved aside, never served.
    newest = store.newest_intact(policies_dir, log)
    if newest is not None:
      self._announce(newest)

  @property
  def latest_version(self) -> int:
    latest = self._latest
    return latest.version if latest else -1

  def publish(self, version: int, network) -> None:
    if version <= self.latest_version:
      # Resumed from a checkpoint older than the newest published version (a
      # crash between the two): announcing it would send collectors back.
      log.info(
        "not publishing v%d: v%d, published before the restart, stays the newest until "
        "training passes it",
        version,
        self.latest_version,
      )
      return
    store.publish(
      self.dir, version, network, self._env, self._net, self._keep, td_target=self._td_target
    )
    self._announce(version)
    PUBLISHES.inc()

  def _announce(self, version: int) -> None:
    path = store.version_dir(self.dir, version)
    manifest = store.read_manifest(path)
    info = fleet_pb2.PolicyVersion(
      version=version,
      published_unix_ms=manifest["published_unix_ms"],
      files=[
        fleet_pb2.PolicyFile(name=n, size_bytes=s, sha256=h) for n, s, h in store.file_digests(path)
      ],
    )
    self._latest = info
    self._announced.notify_all()
    VERSION.set(version)
    POLICY_BYTES.set(sum(f.size_bytes for f in info.files))

  def GetLatestPolicy(self, request, context):
    if self._latest is None:
      context.abort(grpc.StatusCode.NOT_FOUND, "no policy has been published yet")
    return self._latest

  def close(self) -> None:
    """Ends every WatchPolicies stream, as the trainer stops.

    Streams that end by themselves let the server stop without cancelling a
    thousand calls at once, and followers reconnect at once (to a restarted
    trainer) rather than at their next keepalive.
    """
    self._announced.close()

  async def WatchPolicies(self, request, context):
    last = request.after_version
    WATCHERS.inc()
    try:
      while True:
        # Taken before reading _latest and closed, which _announce (on the
        # training thread) and close() set before they notify: a version
        # announced, or a close, in between still wakes this stream.
        announced = self._announced.waiter()
        if self._announced.closed:
          break
        latest = self._latest
        if latest is not None and latest.version > last:
          last = latest.version
          yield latest
        else:
          await announced.wait()
    finally:  # also when the watcher goes away or the server stops (cancelled)
      WATCHERS.dec()

  async def FetchPolicy(self, request, context):
    chunk_bytes = request.max_chunk_bytes or CHUNK_BYTES
    if chunk_bytes < 0:
      await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"max_chunk_bytes must be 0 (the default, {CHUNK_BYTES}) or positive; got {chunk_bytes}",
      )
    FETCHES.inc()
    try:
      try:
        files = await self._version_files(request.version)
      except FileNotFoundError:
        kept = store.list_versions(self.dir)
        await context.abort(
          grpc.StatusCode.NOT_FOUND, f"policy v{request.version} is not kept; kept versions: {kept}"
        )
      except store.Damaged as e:
        await context.abort(grpc.StatusCode.DATA_LOSS, str(e))
      except OSError as e:
        await context.abort(
          grpc.StatusCode.UNAVAILABLE, f"cannot read policy v{request.version} on the trainer: {e}"
        )
      async with self._sending:
        for name, data in files:
          for offset in range(0, len(data), chunk_bytes):
            yield fleet_pb2.PolicyChunk(
              file_name=name, offset=offset, data=data[offset : offset + chunk_bytes]
            )
    finally:
      FETCHES.dec()

  async def _version_files(self, version: int) -> list[tuple[str, bytes]]:
    """A version's files, read and checked against its manifest once, then kept in memory."""
    future = self._files.get(version)
    if future is None:
      future = self._files[version] = asyncio.ensure_future(
        asyncio.to_thread(store.read_verified, store.version_dir(self.dir, version))
      )
      for old in sorted(self._files)[:-CACHED_VERSIONS]:
        del self._files[old]  # downloads sending it hold their own reference
    try:
      # Shielded: one caller going away must not cancel the read the others await.
      return await asyncio.shield(future)
    except Exception:
      if self._files.get(version) is future:
        del self._files[version]  # a failed read is asked of the disk again next time
      raise
