"""Wakes every coroutine waiting for news, on any event loop, from any thread.

The trainer's training thread publishes a policy version; the WatchPolicies
streams that must hear of it are coroutines on the gRPC server's event loop
(policy/server.py). asyncio's own Event may only be set from its loop's
thread, hence this.
"""

import asyncio
import threading


class Broadcast:
  """Wakes every coroutine waiting on a `waiter()`, on any event loop, from any thread.

  Each loop with waiters has one asyncio.Event; `notify_all` sets it from the
  loop's own thread and drops it, so the next `waiter()` there is a fresh one.
  Take the waiter before checking the state it announces: a notification
  between the check and the wait then still wakes it.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
    self.closed = False

  def waiter(self) -> asyncio.Event:
    loop = asyncio.get_running_loop()
    with self._lock:
      return self._events.setdefault(loop, asyncio.Event())

  def close(self) -> None:
    self.closed = True
    self.notify_all()

  def notify_all(self) -> None:
    with self._lock:
      loops = list(self._events)
    for loop in loops:
      try:
        loop.call_soon_threadsafe(self._wake, loop)
      except RuntimeError:  # a closed loop: its server stopped, nobody waits there
        with self._lock:
          self._events.pop(loop, None)

  def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
    with self._lock:
      event = self._events.pop(loop, None)
    if event is not None:
      event.set()
