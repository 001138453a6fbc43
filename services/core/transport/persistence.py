"""Writes to a volume that can fill up: a full disk is an alert, not a crash.

Checkpoints, published policies, summaries and histories are each written by
a service that can go on without them for a while: training, serving the
newest policy and collecting need no new file. `Persistence.attempt` runs one
such write; a failure for lack of space (ENOSPC, a quota) is logged once per
outage with the path and what was skipped, counted in
`dqnfleet_persist_failures_total{what}`, and reported (`ok`, a health name and
a status counter) until the same write succeeds again, which the service's
next periodic write tries by itself. Any other error is the caller's. Each
write stays atomic (a temporary file or directory renamed into place), so
nothing a failed write left is ever read back as valid.
"""

import errno
import logging
import os
import pathlib
import threading
from collections.abc import Callable
from typing import TypeVar

from dqnfleet.core.transport import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
# Health service name: NOT_SERVING while a write fails for lack of space (the
# service works on; liveness and readiness stay as they are, so no probe restarts it).
PERSIST_HEALTH = "persistence"
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
_MESSAGES = ("No space left on device", "Disk quota exceeded")

FAILURES = metrics.counter(
  "persist_failures",
  "Writes skipped for lack of disk space (checkpoints, policies, summaries, histories); "
  "each is retried at its next turn.",
  ["what"],
)
FAILING = metrics.gauge(
  "persist_failing", "1 while a write fails for lack of disk space, else 0.", ["what"]
)


def is_out_of_space(e: BaseException) -> bool:
  """Whether `e` says the disk (or a quota) is full: an OSError, or TensorFlow's or Reverb's
  error, which carry the C library's message."""
  if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
    return True
  text = getattr(e, "message", None) or str(e)
  return any(m in text for m in _MESSAGES)


class Persistence:
  """A service's writes that may fail for lack of space, by what they write."""

  def __init__(self):
    self._lock = threading.Lock()
    self._failing: dict[str, str] = {}  # what -> path, of the writes failing now

  @property
  def ok(self) -> bool:
    with self._lock:
      return not self._failing

  @property
  def failing(self) -> int:
    """How many kinds of write fail now."""
    with self._lock:
      return len(self._failing)

  def attempt(
    self, what: str, path: str, write: Callable[[], T], clean_up: Callable[[], None] = lambda: None
  ) -> T | None:
    """`write()`'s result, or None if it failed for lack of space (then `clean_up()` removes
    what it left). `what` names it in logs and metrics ("checkpoint"), `path` where it goes."""
    try:
      result = write()
    except Exception as e:
      if not is_out_of_space(e):
        raise
      clean_up()
      FAILURES.labels(what=what).inc()
      FAILING.labels(what=what).set(1)
      with self._lock:
        first = what not in self._failing
        self._failing[what] = path
      if first:
        log.error(
          "no space left for the %s in %s: skipped, and retried at each next one until it "
          "succeeds (training and serving go on; free space there)",
          what,
          path,
        )
      return None
    with self._lock:
      recovered = self._failing.pop(what, None) is not None
    if recovered:
      FAILING.labels(what=what).set(0)
      log.info("%s written to %s again: space is back", what, path)
    return result


def append_whole(path: pathlib.Path, text: str) -> bool:
  """Appends all of `text` to `path`, durably, or none of it: a write cut short by a full
  disk is truncated away, so a reader never meets half a line. True when written."""
  with open(path, "a") as f:
    start = f.tell()
    try:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    except OSError:
      f.truncate(start)
      raise
  return True
