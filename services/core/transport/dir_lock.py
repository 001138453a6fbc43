"""One writer per directory: a run directory, an evaluator's output.

Two trainers on one run directory write each other's checkpoints and
policies, and nothing in the files shows it. So a process that writes such a
directory holds an exclusive lock on a file in it, `.dqnfleet-<role>.lock`,
for as long as it runs, and a second writer of the same role exits 2 naming
the holder. `flock` locks belong to the kernel: they end with the process,
however it ends, so a crashed writer never leaves a lock that blocks a
restart. The file also says who holds it (pid, host, since when) and is
emptied by a clean exit, so a holder's details found in it by the next
writer are those of one that died holding it: that writer takes the lock over
and says so in its log.

Roles differ so that a fleet's processes can share a directory (`up` and the
trainer it starts both write the run directory) while two fleets cannot.
"""

import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket

from dqnfleet.core.settings.flags import ConfigError

log = logging.getLogger(__name__)
_held: dict[pathlib.Path, int] = {}  # lock file -> its open descriptor, for the process's life


def lock_path(directory: str | os.PathLike, role: str) -> pathlib.Path:
  return pathlib.Path(directory) / f".dqnfleet-{role}.lock"


def hold(directory: str | os.PathLike, role: str) -> pathlib.Path:
  """Locks `directory` for `role` until the process ends; ConfigError (exit 2) if another
  process holds it."""
  path = lock_path(directory, role)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read(fd)
    os.close(fd)
    raise ConfigError(
      f"{path.parent} is in use: another {role} ({describe(holder)}) writes it and holds "
      f"{path}; stop that one first, or give this {role} a directory of its own"
    ) from None
  previous = _read(fd)
  if previous:
    log.warning("took over %s from %s, which ended without releasing it", path, describe(previous))
  me = {
    "role": role,
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(me).encode(), 0)
  _held[path] = fd
  return path


def release_all() -> None:
  """At a clean exit: empties and unlocks every lock this process holds."""
  for path, fd in list(_held.items()):
    os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor releases the flock
    del _held[path]


def describe(holder: dict) -> str:
  if not holder:
    return "a process that did not say who it is"
  return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0) or b"{}")
  except ValueError:  # half-written by a writer that died mid-write
    return {"pid": "?", "host": "?", "since": "?"}
