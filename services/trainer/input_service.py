"""The trainer's input path on other hosts: a tf.data service dispatcher and its input workers.

A learner that consumes more items per second than its host's cores can
sample and batch (docs/scale.md) hands that work to tf.data service: the
trainer runs a `Dispatcher` (--input-dispatcher-port), `dqnfleet
input-worker`s on other hosts register with it, and each worker runs the
trainer's own pipeline (trainer/dataset.py: Reverb sampling, decoding, n-step
batches) against the replay shards and streams the finished batches to the
trainer ("parallel_epochs": every worker samples on its own, so N workers
feed N times what one does). The trainer's iterator, its priority updates,
deletions and shard watching stay as they are (trainer/replay_source.py).

Measured on the 2-core machine (bench/sample_throughput.py, docs/performance.md):
receiving a batch costs the trainer 42-44 CPU-us per item against 203 for
sampling it itself; a worker spends 250-265 us per item.

tf.data service has no TLS or token (like Reverb's port): its ports belong
on a private network, as replay's does (docs/security.md).
"""

import logging
import socket
import threading

import tensorflow as tf

from dqnfleet.core.settings.config import InputWorkerConfig
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import InputWorkerCounters, Report, StatusServicer

log = logging.getLogger(__name__)
service = tf.data.experimental.service
# A trainer that went away without releasing its job (killed) leaves its
# workers sampling replay for it; the dispatcher ends such jobs after this.
JOB_GC_TIMEOUT_MS = 30_000
HEARTBEAT_MS = 1_000  # how soon a worker hears of the trainer's new jobs
# A learner call waiting this long for a batch: no worker streams.
STALL_S = 15.0


class Dispatcher:
  """The trainer's tf.data service dispatcher: input workers register with it."""

  def __init__(self, port: int):
    try:
      self._server = service.DispatchServer(
        service.DispatcherConfig(
          port=port, job_gc_check_interval_ms=5_000, job_gc_timeout_ms=JOB_GC_TIMEOUT_MS
        )
      )
    except tf.errors.OpError as e:  # how TensorFlow reports a failed bind
      raise rpc.PortUnavailable(
        f"cannot listen on --input-dispatcher-port {port} ({e.message.splitlines()[0]}); "
        "give another port (0: any free one) or -1 to sample in the trainer"
      ) from e
    self.port = int(self._server.target.rsplit(":", 1)[1])
    self.target = f"grpc://localhost:{self.port}"  # for the trainer's own datasets
    self._known = -1  # workers registered at the newest watch
    self._stalled = False  # the newest watch saw a learner call wait longer than STALL_S
    log.info("tf.data service dispatcher on port %d: input workers register there", self.port)

  def workers(self) -> int:
    """Workers that registered since the dispatcher started: TensorFlow keeps a lost one."""
    # No public API counts them; TensorFlow's own tests read this one.
    return self._server._num_workers()

  def watch(self, waiting_s: float | None) -> None:
    """Logs when workers register, and once when the learner has waited `waiting_s` for a
    batch longer than STALL_S (the replay watcher calls it; None: no call in flight)."""
    now = self.workers()
    if now != self._known:
      if now == 0:
        log.warning(
          "no input worker registered with the dispatcher on port %d: no batches until one "
          "does (dqnfleet input-worker --dispatcher-address <this host>:%d)",
          self.port,
          self.port,
        )
      else:
        log.info("input workers registered: %d", now)
      self._known = now
    stalled = now > 0 and waiting_s is not None and waiting_s > STALL_S
    if stalled and not self._stalled:
      # Replay's own waits end the pipeline within SAMPLE_TIMEOUT_MS, and the trainer says
      # why; a wait this long is the workers'.
      log.warning(
        "no batch from the input workers for %.0f s: %d registered, but none streams "
        "(lost? TensorFlow keeps a lost worker registered); start one, training resumes "
        "when it registers",
        waiting_s,
        now,
      )
    elif self._stalled and not stalled:  # the call that waited ended
      log.info("batches from the input workers again")
    self._stalled = stalled


def advertised_address(config: InputWorkerConfig, stop: threading.Event) -> str | None:
  """The address the trainer is told to fetch from: --worker-address, or this host's address
  on the route to the dispatcher (waits until the dispatcher's name resolves)."""
  if config.worker_address:
    return config.worker_address
  host, port = config.dispatcher_address.rsplit(":", 1)

  def route() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
      probe.connect((host, int(port)))  # UDP: picks the route, sends nothing
      return probe.getsockname()[0]

  mine = rpc.retry(
    route, f"finding the route to the dispatcher at {config.dispatcher_address}", stop
  )
  # %port% is TensorFlow's: the port it bound (--port 0 picks one).
  return None if mine is None else f"{mine}:{config.port or '%port%'}"


def serve(config: InputWorkerConfig, stop: threading.Event, security: Security, service_id: str):
  """Runs an input worker until `stop`: health and status first, then registration, which
  waits for the dispatcher."""
  import reverb  # noqa: F401  the trainer's pipelines use Reverb's dataset ops

  worker: list = []  # the WorkerServer once registered

  def snapshot() -> Report:
    pipelines = worker[0]._num_tasks() if worker else 0  # private, as _num_workers above
    return Report(InputWorkerCounters(registered=int(bool(worker)), pipelines=pipelines))

  status = StatusServicer("input-worker", service_id, "", snapshot)
  side_server, side_port = rpc.start_server(
    config.status_port, status, security=security, stop=stop, ready=lambda: bool(worker)
  )
  log.info("health and status on port %d", side_port)

  def register() -> None:
    address = advertised_address(config, stop)
    if address is None:
      return
    log.info(
      "registering with the dispatcher at %s as %s (waits until it answers)",
      config.dispatcher_address,
      address,
    )
    try:
      server = service.WorkerServer(
        service.WorkerConfig(
          dispatcher_address=config.dispatcher_address,
          worker_address=address,
          port=config.port,
          heartbeat_interval_ms=HEARTBEAT_MS,
        )
      )
    except tf.errors.OpError as e:  # its port: nothing else can go wrong before it registers
      log.error("cannot serve batches on --port %d: %s", config.port, e.message.splitlines()[0])
      stop.set()
      return
    worker.append(server)
    log.info("registered; batches for the trainer on port %d", config.port)

  threading.Thread(target=register, name="register", daemon=True).start()
  try:
    stop.wait()
  finally:
    side_server.stop(grace=1)
    if worker:
      worker[0]._stop()
    log.info("stopped")
