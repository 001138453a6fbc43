"""TensorBoard for the whole fleet without a shared filesystem.

Collectors and the evaluator queue their scalars in a `SummaryReporter`,
which sends them to the trainer's SummaryService every few seconds; the
trainer's `SummaryWriter` writes them into its own logdir, next to its own
summaries:

    <trainer run dir>/tensorboard/trainer       loss, train rate, replay size, policy lag
    <trainer run dir>/tensorboard/collectors    episode returns and lengths, epsilon, version
    <trainer run dir>/tensorboard/evaluator     evaluation returns by policy version

So one TensorBoard that reads the trainer's volume shows everything, under
`dqnfleet up`, docker compose and Kubernetes alike.
"""

import collections
import logging
import math
import os
import re
import threading

import grpc

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.persistence import Persistence
from dqnfleet.core.transport.security import Security

log = logging.getLogger(__name__)

# The TensorBoard run (subfolder of the logdir) of each role that may report.
RUNS = {"collector": "collectors", "evaluator": "evaluator"}
TAG = re.compile(r"[A-Za-z0-9_./-]{1,128}")
MAX_SCALARS = 1000
REPORT_EVERY_S = 10.0
# Scalars kept while the trainer is unreachable; the oldest go first.
MAX_PENDING = 10_000
MAX_RETRY_S = 120.0


def check_report(report: fleet_pb2.SummaryReport) -> str | None:
  """What is wrong with `report`, or None."""
  if report.role not in RUNS:
    return f"role {report.role!r} may not report summaries; allowed: {', '.join(RUNS)}"
  if not report.source_id or len(report.source_id) > 253:
    return "source_id must be 1 to 253 characters"
  if len(report.scalars) > MAX_SCALARS:
    return f"{len(report.scalars)} scalars in one report; at most {MAX_SCALARS}"
  for scalar in report.scalars:
    if not TAG.fullmatch(scalar.tag):
      return (
        f"tag {scalar.tag[:140]!r} is not allowed: 1 to 128 characters of letters, "
        "digits and _ . / -"
      )
    if not math.isfinite(scalar.value):
      return f"tag {scalar.tag}: value {scalar.value} is not a finite number"
    if scalar.step < 0:
      return f"tag {scalar.tag}: step {scalar.step} is negative"
  return None


class SummaryWriter(fleet_pb2_grpc.SummaryServiceServicer):
  """The trainer's end: writes reported scalars into `logdir`/<run of the role>."""

  def __init__(self, logdir: str, persistence: Persistence | None = None):
    self._logdir = logdir
    # A full disk drops reports (counted and logged there) instead of failing the call.
    self._persistence = persistence or Persistence()
    self._writers = {}
    self._lock = threading.Lock()

  def _writer(self, role: str):
    import tensorflow as tf  # the trainer has it loaded already

    if role not in self._writers:
      # Flushed every 10 s rather than on every report: a thousand collectors
      # reporting every 10 s would otherwise mean 100 file flushes a second.
      self._writers[role] = tf.summary.create_file_writer(
        os.path.join(self._logdir, RUNS[role]), flush_millis=10_000
      )
    return self._writers[role]

  def Report(self, request, context):
    problem = check_report(request)
    if problem:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"summary report refused: {problem}")
    import tensorflow as tf

    def write() -> int:
      with self._lock, self._writer(request.role).as_default():
        for scalar in request.scalars:
          tf.summary.scalar(scalar.tag, scalar.value, step=scalar.step)
      return len(request.scalars)

    written = self._persistence.attempt(
      "fleet's TensorBoard summaries", os.path.join(self._logdir, RUNS[request.role]), write
    )
    return fleet_pb2.SummaryAck(written=written or 0)

  def close(self) -> None:
    with self._lock:
      for writer in self._writers.values():
        writer.close()


class SummaryReporter:
  """A sender's end: queues scalars, a background thread sends them to the trainer.

  While the trainer is unreachable the scalars wait (up to MAX_PENDING, the
  oldest dropped first) and the reporter says so once, then retries with
  backoff; training and collection never wait for it.
  """

  def __init__(
    self,
    trainer_address: str,
    role: str,
    source_id: str,
    *,
    security: Security,
    every_s: float = REPORT_EVERY_S,
  ):
    self._address, self._role, self._source = trainer_address, role, source_id
    self._security = security
    self._every_s = every_s
    self._closing = threading.Event()
    self._pending = collections.deque(maxlen=MAX_PENDING)
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="summary-reporter", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def close(self, timeout: float = 5.0) -> None:
    """Sends what is queued (waiting at most `timeout`), then stops the thread."""
    self._closing.set()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def scalar(self, tag: str, step: int, value: float) -> None:
    if not math.isfinite(value):  # e.g. the mean of no episodes yet
      return
    with self._lock:
      self._pending.append(fleet_pb2.Scalar(tag=tag, step=int(step), value=float(value)))

  def _run(self) -> None:
    delay, failing = self._every_s, False
    with rpc.channel(self._address, self._security) as channel:
      stub = fleet_pb2_grpc.SummaryServiceStub(channel)
      while True:
        stopping = self._closing.wait(delay)
        try:
          self._send(stub, timeout=2 if stopping else 10)
          if failing:
            log.info("summaries reach the trainer at %s again", self._address)
          delay, failing = self._every_s, False
        except grpc.RpcError as e:
          if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # our bug: say so, drop the batch
            log.error("the trainer refused summaries: %s", e.details())
          else:
            if not failing:
              log.warning(
                "cannot send summaries to the trainer at %s (%s); keeping up to %d "
                "scalars and retrying with backoff",
                self._address,
                e.code().name,
                MAX_PENDING,
              )
            delay, failing = min(delay * 2, MAX_RETRY_S), True
        if stopping:
          return

  def _send(self, stub, timeout: float) -> None:
    while True:
      with self._lock:
        batch = [self._pending.popleft() for _ in range(min(MAX_SCALARS, len(self._pending)))]
      if not batch:
        return
      try:
        stub.Report(
          fleet_pb2.SummaryReport(role=self._role, source_id=self._source, scalars=batch),
          timeout=timeout,
        )
      except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
          with self._lock:  # back to the front, in order, for the next attempt
            self._pending.extendleft(reversed(batch))
        raise
