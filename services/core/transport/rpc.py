"""gRPC plumbing every service shares: servers, health, status, retries."""

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.transport.security import PLAINTEXT, Security
from dqnfleet.core.transport.status import Status, decode

T = TypeVar("T")
log = logging.getLogger(__name__)

# Keepalives notice a peer whose packets vanish (a partition, a node lost)
# within KEEPALIVE_S + PING_TIMEOUT_S, instead of a stream waiting for it
# for as long as TCP retries (many minutes). grpcio 1.62 waits for a ping's
# answer for `ping_timeout_ms` (a minute by default), not for
# `keepalive_timeout_ms`, and sends no more than two pings on a connection
# that sends no data, such as a quiet WatchPolicies stream, unless
# `max_pings_without_data` is 0: without both, a cut link was noticed after
# 60-70 s or never (tests/test_partition.py).
KEEPALIVE_S = 10
PING_TIMEOUT_S = 5
CHANNEL_OPTIONS = [
  ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
  ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
  ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_S * 1000),
  ("grpc.http2.max_pings_without_data", 0),
  ("grpc.keepalive_permit_without_calls", 1),
  ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
SERVER_OPTIONS = [
  # gRPC turns SO_REUSEPORT on by default, so a second process given the
  # same port would start and share it, answering health checks at random.
  ("grpc.so_reuseport", 0),
  ("grpc.keepalive_permit_without_calls", 1),
  # Below the clients' keepalive interval: a ping that arrives a little
  # early must not count as abuse, which ends the connection.
  ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
]


class PortUnavailable(OSError):
  """A server cannot listen on the port it was given; the message names it."""


# Health service names: "" is liveness (the process answers), READINESS says
# whether the service can do its job now (Kubernetes readinessProbe, compose
# healthcheck); it turns NOT_SERVING as soon as the service is asked to stop,
# before it drains, so no new work is routed to it.
READINESS = "readiness"
READINESS_POLL_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How long past its grace a server may take to stop before its service exits regardless.
STOP_MARGIN_S = 5.0


class _Aborted(Exception):
  """Ends a thread-pool handler whose context.abort() has sent the status."""


class _AbortingContext:
  def __init__(self, context):
    self._context = context

  def abort(self, *args, **kwargs):
    self._context.abort(*args, **kwargs)
    raise _Aborted()

  def __getattr__(self, name):
    return getattr(self._context, name)


def _abort_ends(behavior, streaming: bool):
  if streaming:

    def wrapped(request, context):
      try:
        yield from behavior(request, _AbortingContext(context))
      except _Aborted:
        return  # grpc.aio then finishes the call with the status abort() sent
  else:

    def wrapped(request, context):
      try:
        return behavior(request, _AbortingContext(context))
      except _Aborted:
        return None

  return wrapped


class AbortEndsHandler(grpc.aio.ServerInterceptor):
  """context.abort() ends a plain (thread-pool) handler, as it does on grpc.server.

  grpc.aio gives such a handler a context whose abort() sends the status and
  returns: the handler would go on, e.g. write the summary report it has just
  refused. Coroutine handlers are left alone: their abort() raises.
  """

  async def intercept_service(self, continuation, handler_call_details):
    handler = await continuation(handler_call_details)
    if handler is None:
      return None
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
      behavior = getattr(handler, name)
      if behavior is not None and not (
        asyncio.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
      ):
        return handler._replace(**{name: _abort_ends(behavior, handler.response_streaming)})
    return handler


class Server:
  """A grpc.aio server on an event loop of its own (a daemon thread), for synchronous callers.

  A waiting stream is a suspended coroutine, not a thread: the trainer holds
  one WatchPolicies stream per collector and evaluator, a thousand or more,
  which once took a thread each and starved health checks and new calls.
  Servicer methods written as plain functions (status, summaries,
  GetLatestPolicy) run in a thread pool of `max_workers`, so they may block.
  """

  def __init__(self, max_workers: int, security: Security):
    self.security = security
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
    self._thread.start()
    # Health checks run on the loop itself: they answer while the pool is busy.
    self.health = health.aio.HealthServicer()
    self._readiness = None
    self._health: dict[str, Callable[[], bool]] = {}  # start_server's `health`
    self._stopping = False
    self._pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
    # grpc.aio binds a server to the loop it is created on.
    self.aio = self.call(self._create())

  async def _create(self) -> grpc.aio.Server:
    interceptors = self.security.server_interceptors() + [AbortEndsHandler()]
    return grpc.aio.server(
      migration_thread_pool=self._pool, options=SERVER_OPTIONS, interceptors=interceptors
    )

  def call(self, coroutine, timeout: float | None = None):
    """Runs `coroutine` on the server's loop; returns its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

  async def _start(
    self, ready: Callable[[], bool], stop: threading.Event, health: Mapping[str, Callable[[], bool]]
  ) -> None:
    self._health = dict(health)
    await self.aio.start()
    for name in ("", "dqnfleet.v1.StatusService"):
      await self.health.set(name, SERVING)
    for name in (READINESS, *self._health):
      await self.health.set(name, NOT_SERVING)
    self._readiness = asyncio.create_task(self._follow_readiness(ready, stop))

  async def _follow_readiness(self, ready: Callable[[], bool], stop: threading.Event) -> None:
    # ready() runs on the loop: the services' checks only read a few attributes.
    while not stop.is_set():
      for name, check in {READINESS: ready, **self._health}.items():
        try:
          ok = check()
        except Exception:  # a half-built service is not ready
          ok = False
        await self.health.set(name, SERVING if ok and not stop.is_set() else NOT_SERVING)
      # A thread of the default executor waits, so that stop turns readiness
      # off at once rather than at the next poll.
      await self.loop.run_in_executor(None, stop.wait, READINESS_POLL_S)
    await self._not_serving()

  async def _not_serving(self) -> None:
    for name in (READINESS, *self._health):
      await self.health.set(name, NOT_SERVING)

  async def _stop(self, grace: float | None) -> None:
    if self._readiness:
      self._readiness.cancel()
    await self._not_serving()
    # Calls in flight get `grace` seconds; open streams are cancelled after it.
    await self.aio.stop(grace)

  def stop(self, grace: float | None = None) -> None:
    """Stops serving (open streams end after `grace` seconds) and ends the loop's thread."""
    if self._stopping:
      return
    self._stopping = True
    try:
      self.call(self._stop(grace), timeout=(grace or 0) + STOP_MARGIN_S)
    except TimeoutError:
      # A stopping service must not hang on its server: the process exits anyway.
      log.warning(
        "the gRPC server did not stop within %.0fs; leaving it to the process exit",
        (grace or 0) + STOP_MARGIN_S,
      )
      return
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join()
    self.loop.close()
    self._pool.shutdown(wait=False)


def start_server(
  port: int,
  status: fleet_pb2_grpc.StatusServiceServicer,
  *,
  security: Security,
  extra: Callable[[grpc.aio.Server], None] | None = None,
  max_workers: int = 16,
  ready: Callable[[], bool] = lambda: True,
  stop: threading.Event | None = None,
  health: Mapping[str, Callable[[], bool]] | None = None,
) -> tuple[Server, int]:
  """Starts a server with health, status and `extra` services; returns it and its port.

  `security` (no default: a server must not fall back to plaintext because a
  caller forgot it) gives the listen address, TLS and token. `extra` adds
  services to the grpc.aio server: `async def` methods run on its event
  loop, plain ones in its thread pool. Readiness follows `ready()` (polled
  every second) until `stop` is set, and so does each further health service
  name of `health` ({name: check}), e.g. a state that still lets the service
  work but that a health check should see.
  """
  server = Server(max_workers, security)
  try:
    health_pb2_grpc.add_HealthServicer_to_server(server.health, server.aio)
    fleet_pb2_grpc.add_StatusServiceServicer_to_server(status, server.aio)
    if extra:
      extra(server.aio)
    address = security.bind_address(port)
    try:
      bound = (
        server.aio.add_secure_port(address, security.server_credentials)
        if security.server_credentials
        else server.aio.add_insecure_port(address)
      )
    except RuntimeError:  # how grpcio reports a failed bind
      bound = 0
    if bound == 0:
      raise PortUnavailable(
        f"cannot listen on port {port}: it is in use or not allowed, or --listen-host "
        f"{security.listen_host} is not an address of this machine; give the service "
        "another port (0: any free one) or listen host"
      )
    server.call(server._start(ready, stop or threading.Event(), health or {}))
  except BaseException:
    server.stop(grace=0)
    raise
  return server, bound


def channel(address: str, security: Security = PLAINTEXT) -> grpc.Channel:
  """A channel to one of the project's servers, with `security`'s TLS and token."""
  return security.channel(address, CHANNEL_OPTIONS)


def get_status(address: str, timeout: float = 5.0, security: Security = PLAINTEXT) -> Status:
  """The service's status as its role's typed record (transport/status.py)."""
  with channel(address, security) as ch:
    return decode(
      fleet_pb2_grpc.StatusServiceStub(ch).GetStatus(fleet_pb2.GetStatusRequest(), timeout=timeout)
    )


def check_health(
  address: str, timeout: float = 3.0, service: str = "", security: Security = PLAINTEXT
) -> bool:
  """Whether `service` ("" = liveness, READINESS) answers SERVING."""
  try:
    with channel(address, security) as ch:
      reply = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout
      )
    return reply.status == health_pb2.HealthCheckResponse.SERVING
  except grpc.RpcError:
    return False


# Reconnect loops retry at least this often: a peer back from a partition
# or a restart is found within seconds (at most 1.5 x this, with jitter).
BACKOFF_CAP_S = 5.0
# A peer that stays unreachable is named again in the log this often.
OUTAGE_REMIND_S = 60.0


class Backoff:
  """Exponential backoff with a cap and jitter, for reconnect loops.

  Each wait is the current delay times a random factor in [0.5, 1.5): a
  thousand collectors that lost the same server do not all come back in the
  same instant.
  """

  def __init__(self, first: float = 0.5, cap: float = BACKOFF_CAP_S):
    self._first, self._cap = first, cap
    self.delay = first

  def reset(self) -> None:
    self.delay = self._first

  def jittered(self) -> float:
    return self.delay * random.uniform(0.5, 1.5)

  def wait(self, stop: threading.Event | None = None) -> bool:
    """Sleeps about the current delay (or until `stop`), doubles it; True if stopped."""
    seconds = self.jittered()
    stopped = stop.wait(seconds) if stop else (time.sleep(seconds) or False)
    self.delay = min(self.delay * 2, self._cap)
    return bool(stopped)


def first_line(e: BaseException) -> str:
  """An error's first line (its type if it has no text), for a log line."""
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


class Outage:
  """A peer's outage as the log tells it: its start, a changed reason, a reminder, its end.

  A loop that retries every few seconds would log a line per try for as long
  as a partition lasts; the operator needs when it began, why, whether it
  goes on, and when and after how long it ended.
  """

  def __init__(self, logger: logging.Logger = log):
    self._log = logger
    self.since: float | None = None  # monotonic time of the first failure; None: no outage
    self._reason = ""
    self._told = 0.0
    self._lock = threading.Lock()  # a watcher thread may end what the main thread began

  @property
  def active(self) -> bool:
    return self.since is not None

  def failed(self, message: str, reason: str) -> None:
    """Logs `message` as a warning at the outage's first failure, when `reason` changes and
    every OUTAGE_REMIND_S; the other failures at debug level."""
    with self._lock:
      now = time.monotonic()
      if self.since is None:
        self.since = now
      elif reason == self._reason and now - self._told < OUTAGE_REMIND_S:
        self._log.debug("%s", message)
        return
      else:
        message += f" (failing for {now - self.since:.0f}s)"
      self._reason, self._told = reason, now
    self._log.warning("%s", message)

  def over(self, message: str) -> None:
    """Logs `message` and how long the outage lasted, if one was going on."""
    with self._lock:
      if self.since is None:
        return
      lasted, self.since = time.monotonic() - self.since, None
    self._log.info("%s after %.1fs", message, lasted)


def retry(
  fn: Callable[[], T],
  what: str,
  stop: threading.Event | None = None,
  errors: tuple[type[BaseException], ...] = (Exception,),
) -> T | None:
  """Calls `fn` until it succeeds, logging the outage (Outage); None if `stop` is set first."""
  backoff, outage = Backoff(), Outage()
  while True:
    try:
      result = fn()
    except errors as e:  # the peer is down or not up yet: say so, then wait
      reason = first_line(e)
      outage.failed(f"{what} failed ({reason}); retrying in {backoff.delay:.1f}s", reason)
      if backoff.wait(stop):
        return None
    else:
      outage.over(f"{what} succeeded")
      return result
