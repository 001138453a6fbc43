"""Follows the trainer's published policies: the "updated policy" arrow.

A background thread subscribes to PolicyService.WatchPolicies, downloads each
new version into its own cache (no filesystem is shared with the trainer),
loads it into a staging network, and hands the weights to the acting loop: a
collector swaps them in between two environment steps, the evaluator
evaluates them.
"""

import logging
import pathlib
import shutil
import tempfile
import threading

import grpc

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.policy import client, store
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import Security

log = logging.getLogger(__name__)
# The health name under which a follower's service says whether the trainer's
# policy API answers (a service that cannot hear of new versions still works
# with the one it has: it stays ready).
TRAINER_HEALTH = "trainer"


class PolicyFollower:
  """Background subscription to new policy versions."""

  def __init__(
    self, trainer_address: str, staging_network, stop: threading.Event, *, security: Security
  ):
    """`staging_network` None: build it from the first version's manifest."""
    self._address, self._security = trainer_address, security
    self._staging = staging_network
    self.env_config = self.network_config = None  # set from the manifest if not given
    # The trainer's TD target settings, from the newest version's manifest
    # (None until one arrives, or if it was published without them).
    self.td_target = None
    self._stop = stop
    self._cache = pathlib.Path(tempfile.mkdtemp(prefix="dqnfleet-policies-"))
    self._lock = threading.Lock()
    self._pending = None  # (version, weights) not yet taken by the acting loop
    self._stream = None  # the open WatchPolicies call, cancelled at stop
    self.latest_seen = -1
    # Whether the channel to the trainer is connected now (keepalives drop it
    # within seconds of a partition: rpc.KEEPALIVE_S).
    self.reachable = False
    self._outage = rpc.Outage(log)
    self._thread = threading.Thread(target=self._run, name="policy-follower", daemon=True)

  def start(self) -> None:
    self._thread.start()
    # A stream blocks until the trainer announces something; stop must not wait for that.
    threading.Thread(target=self._cancel_at_stop, name="policy-follower-stop", daemon=True).start()

  def _cancel_at_stop(self) -> None:
    self._stop.wait()
    stream = self._stream
    if stream is not None:
      stream.cancel()

  def take(self):
    """The newest downloaded (version, weights) since the last call, or None."""
    with self._lock:
      pending, self._pending = self._pending, None
    return pending

  def _connectivity(self, state: grpc.ChannelConnectivity) -> None:
    self.reachable = state == grpc.ChannelConnectivity.READY
    if self.reachable:
      self._outage.over(f"trainer policy API at {self._address} answers again")

  def _run(self) -> None:
    backoff = rpc.Backoff()
    while not self._stop.is_set():
      try:
        with rpc.channel(self._address, self._security) as channel:
          channel.subscribe(self._connectivity, try_to_connect=True)
          stub = fleet_pb2_grpc.PolicyServiceStub(channel)
          stream = stub.WatchPolicies(
            fleet_pb2.WatchPoliciesRequest(after_version=self.latest_seen)
          )
          self._stream = stream
          if self._stop.is_set():  # stopped while connecting
            break
          for info in stream:
            backoff.reset()
            if info.version > self.latest_seen:
              self._load(stub, info)
      except grpc.RpcError as e:
        if self._stop.is_set():
          break
        self.reachable = False
        # The trainer's reason too: a version damaged on its disk (DATA_LOSS) is
        # not an unreachable trainer.
        reason = f"{e.code().name} ({e.details()})"
        self._outage.failed(
          f"trainer policy API at {self._address}: {reason}; retrying in {backoff.delay:.1f}s",
          reason,
        )
      except Exception as e:  # a corrupted download or a mismatched network: say so, retry
        log.error(
          "could not load policy from %s: %s; retrying in %.1fs", self._address, e, backoff.delay
        )
      if backoff.wait(self._stop):
        break
    shutil.rmtree(self._cache, ignore_errors=True)

  def _load(self, stub, info) -> None:
    path = client.fetch(stub, info, self._cache)
    if self._staging is None:  # a follower told nothing of the env learns it from the manifest
      self.env_config, self.network_config = store.configs_of(store.read_manifest(path))
      self._staging = store.load(path)[2]
    store.restore_weights(self._staging, path)
    weights = self._staging.get_weights()
    self.td_target = store.td_target_of(store.read_manifest(path))
    with self._lock:
      self._pending = (info.version, weights)
    self.latest_seen = info.version
    # Older copies are no longer needed: the weights are in memory.
    for old in store.list_versions(self._cache)[:-1]:
      shutil.rmtree(store.version_dir(self._cache, old), ignore_errors=True)
    log.debug("downloaded policy v%d", info.version)
