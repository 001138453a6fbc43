"""Shared test helpers: real services as real processes on loopback ports."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dqnfleet.cli.up import free_port  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Services in tests serve metrics on a free port unless a test names one:
# several of one role run at once on this host.
SERVICE_ENV = {"DQNFLEET_METRICS_PORT": "0"}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
  """Polls `predicate` until it returns a truthy value; fails the test after `timeout`."""
  deadline = time.monotonic() + timeout
  last_error = None
  while time.monotonic() < deadline:
    try:
      value = predicate()
      if value:
        return value
    except Exception as e:  # the service may still be starting
      last_error = e
    time.sleep(interval)
  pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class Service:
  """One `dqnfleet <role>` process with its log file."""

  def __init__(self, name: str, args: list[str], log_dir: pathlib.Path, env: dict | None = None):
    self.name = name
    self.log_path = log_dir / f"{name}.log"
    self._log = open(self.log_path, "ab")
    self.proc = subprocess.Popen([sys.executable, "-m", "dqnfleet", *args], stdout=self._log,
                                 stderr=subprocess.STDOUT,
                                 env={**SERVICE_ENV, **os.environ, **(env or {})})

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def stop(self, timeout: float = 30) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()[-3000:]}")
    self._log.close()
    return self.proc.returncode


@pytest.fixture
def services(tmp_path):
  """Starts services; stops whatever is still running at the end of the test."""
  started: list[Service] = []

  def start(name: str, *args: str, env: dict | None = None) -> Service:
    service = Service(name, list(args), tmp_path, env)
    started.append(service)
    return service

  yield start
  for service in reversed(started):
    if service.proc.poll() is None:
      service.proc.kill()
      service.proc.wait()


def dqnfleet(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs one `dqnfleet` command to completion."""
  return subprocess.run([sys.executable, "-m", "dqnfleet", *args], capture_output=True, text=True,
                        timeout=timeout, env={**SERVICE_ENV, **os.environ, **(env or {})})
