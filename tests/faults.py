"""A network partition between two real processes: a TCP proxy the test controls.

A `Link` listens on a loopback port and forwards every connection to a
service's port, byte for byte, in both directions. `cut()` partitions the
link the way a failed switch or a partitioned node does: nothing is refused
and nothing is closed, bytes simply stop arriving. Each direction holds what
it has read and reads no more, so the sender's socket buffers fill as they
do when packets vanish (its keepalive pings go unanswered), a connection
opened meanwhile is accepted but reaches nothing, and a close is not passed
on either. `heal()` delivers what was held and forwards again, as TCP's
retransmissions do once a partition of less than its retry limit
(minutes) ends.

Services are pointed at `link.address` instead of the service's own port;
traffic never leaves the machine. Used by tests/test_partition.py and
bench/partition.py.
"""

import socket
import threading
import time

from dqnfleet.cli.up import free_port

CHUNK = 64 * 1024


class Link:
  """A proxy on 127.0.0.1 to `target_port`, cut and healed at will."""

  def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
    self._target = (target_host, target_port)
    self._flowing = threading.Event()
    self._flowing.set()
    self._closed = False
    self._listener = socket.create_server(("127.0.0.1", free_port()))
    self.port = self._listener.getsockname()[1]
    self._sockets: list[socket.socket] = [self._listener]
    self._lock = threading.Lock()
    threading.Thread(target=self._accept, name=f"link-{self.port}", daemon=True).start()

  @property
  def address(self) -> str:
    return f"localhost:{self.port}"

  @property
  def cut_now(self) -> bool:
    return not self._flowing.is_set()

  def cut(self) -> None:
    """From now on nothing gets through, in either direction, until heal()."""
    self._flowing.clear()

  def heal(self) -> None:
    """Delivers what was held back and forwards again."""
    self._flowing.set()

  def close(self) -> None:
    self._closed = True
    self._flowing.set()
    with self._lock:
      for s in self._sockets:
        try:
          s.close()
        except OSError:
          pass

  def _track(self, s: socket.socket) -> None:
    with self._lock:
      self._sockets.append(s)

  def _accept(self) -> None:
    while not self._closed:
      try:
        downstream, _ = self._listener.accept()
      except OSError:
        return
      self._track(downstream)
      threading.Thread(target=self._connect, args=(downstream,), daemon=True).start()

  def _connect(self, downstream: socket.socket) -> None:
    self._flowing.wait()  # a connection opened during a cut reaches nothing until it heals
    try:
      upstream = socket.create_connection(self._target)
    except OSError:  # the service is down: refused, as it would be without the link
      downstream.close()
      return
    self._track(upstream)
    for source, sink in ((downstream, upstream), (upstream, downstream)):
      threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

  def _pump(self, source: socket.socket, sink: socket.socket) -> None:
    while True:
      try:
        data = source.recv(CHUNK)
      except OSError:
        data = b""
      self._flowing.wait()  # held while cut: neither bytes nor a close get through
      if self._closed:
        return
      try:
        if not data:
          sink.shutdown(socket.SHUT_WR)
          return
        sink.sendall(data)
      except OSError:
        source.close()
        return


class Clock:
  """Seconds since it was started, and the first instant each of several conditions held."""

  def __init__(self):
    self.start = time.monotonic()

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def until(self, conditions: dict, timeout: float, interval: float = 0.25) -> dict:
    """Polls every condition ({name: predicate}) until all held once; {name: seconds}
    (None for those that never held within `timeout`)."""
    seen: dict = dict.fromkeys(conditions)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and None in seen.values():
      for name, holds in conditions.items():
        if seen[name] is None:
          try:
            if holds():
              seen[name] = round(self.elapsed(), 1)
          except Exception:  # a service that does not answer yet: not held
            pass
      time.sleep(interval)
    return seen
