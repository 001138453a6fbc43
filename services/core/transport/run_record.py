"""What produced a run: resolved settings, package versions, git revision.

Every service logs this record once at start; the trainer and the evaluator
also write it to `run.json` in their directory (run directory, output
directory), and `dqnfleet up` writes its own for the whole fleet. run.json
holds one entry per role, so services that share a directory
(`up` and the trainer it starts) keep each other's.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import socket
import subprocess
import tempfile

log = logging.getLogger(__name__)
FILE = "run.json"
# Read from the image when there is no git checkout (deploy/Dockerfile).
GIT_REVISION_ENV = "DQNFLEET_GIT_REVISION"
PACKAGES = (
  "dqnfleet",
  "tensorflow",
  "tf-agents",
  "dm-reverb",
  "gymnasium",
  "ale-py",
  "numpy",
  "grpcio",
  "protobuf",
  "prometheus-client",
)


def git_revision() -> str:
  """The commit of the source checkout this package runs from, "-dirty" if the package's
  own files differ from it (docs or results files written meanwhile do not count: they are
  not what ran); or the image's commit; or ''."""
  package = pathlib.Path(__file__).resolve().parents[2]

  def git(*args: str) -> str | None:
    out = subprocess.run(
      ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=5
    )
    return out.stdout.strip() if out.returncode == 0 else None

  try:
    commit = git("rev-parse", "HEAD")
    if commit:
      changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
      return commit + ("-dirty" if changed else "")
  except (OSError, subprocess.TimeoutExpired):  # no git on the host (containers)
    pass
  return os.environ.get(GIT_REVISION_ENV, "")


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def create(role: str, service_id: str, configs: list) -> dict:
  """The record of this process: who it is, what it runs, with which settings."""
  return {
    "role": role,
    "id": service_id,
    "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "git_revision": git_revision(),
    "python": platform.python_version(),
    "packages": package_versions(),
    "config": {type(c).__name__: dataclasses.asdict(c) for c in configs},
  }


def publish(record: dict, directory: str | os.PathLike | None) -> pathlib.Path | None:
  """Logs `record` on one line and stores it under its role in `directory`/run.json."""
  log.info("run record: %s", json.dumps(record, sort_keys=True))
  if not directory:
    return None
  path = pathlib.Path(directory) / FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    records = json.loads(path.read_text())
    if not isinstance(records, dict):
      records = {}
  except (FileNotFoundError, json.JSONDecodeError):
    records = {}
  records[record["role"]] = record
  # Written whole or not at all: a reader never sees half a file.
  with tempfile.NamedTemporaryFile(
    "w", dir=path.parent, prefix=".run-", suffix=".json", delete=False
  ) as f:
    json.dump(records, f, indent=2, sort_keys=True)
  os.replace(f.name, path)
  return path
