"""Process set-up shared by every service: logging, quiet TensorFlow, signals."""

import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import types


def prepare_tensorflow() -> None:
  """TensorFlow's process settings, and start-up chatter that is not ours kept out of the logs.

  Must run before TensorFlow is imported; a user's own environment wins.
  TF_ENABLE_ONEDNN_OPTS=1: TF 2.15 turns its oneDNN CPU kernels on by itself
  only on CPUs with AVX-512 VNNI/BF16 or AMX. Without them, on an AVX2 EPYC,
  the Nature CNN's train step ran at 20 steps/s with TF's own kernels and
  25 with oneDNN's, and TF's own 3-D convolution gradient (the stacked-frames
  layer's, core/rl/networks.py) took 53 s a step (docs/performance.md).
  TF_CPP_MIN_LOG_LEVEL hides the C++ CUDA probing on CPU hosts. tf-agents
  imports the deprecated `gym` for suites dqnfleet does not use, and gym
  prints a banner telling the user to move to gymnasium, which dqnfleet
  already uses.
  """
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.modules.setdefault("gym_notices.notices", types.SimpleNamespace(notices={}))


class JsonFormatter(logging.Formatter):
  """One JSON object per line, for log pipelines (Loki, Elasticsearch, Cloud Logging)."""

  def __init__(self, role: str, service_id: str):
    super().__init__()
    self._role, self._id = role, service_id

  def format(self, record: logging.LogRecord) -> str:
    entry = {
      "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
        timespec="milliseconds"
      ),
      "level": record.levelname,
      "service": self._role,
      "instance": self._id,
      "logger": record.name,
      "message": record.getMessage(),
    }
    if record.exc_info:
      entry["exception"] = self.formatException(record.exc_info)
    return json.dumps(entry)


def setup_logging(role: str, service_id: str, level: str = "INFO", fmt: str = "text") -> None:
  """Text lines for people (the default) or JSON lines for machines (`fmt="json"`)."""
  handler = logging.StreamHandler()
  if fmt == "json":
    handler.setFormatter(JsonFormatter(role, service_id))
  else:
    handler.setFormatter(
      logging.Formatter(
        f"%(asctime)s %(levelname)s {role}[{service_id}] %(message)s", datefmt="%H:%M:%S"
      )
    )
  logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # TensorFlow's deprecation notices (from inside tf-agents) are not actionable here.
  logging.getLogger("tensorflow").setLevel(logging.ERROR)


def default_id(role: str) -> str:
  """hostname-pid: unique per process, and a pod's or container's name in clusters."""
  return f"{socket.gethostname()}-{os.getpid()}" if role == "collector" else role


def stop_on_signals() -> threading.Event:
  """An event set by SIGTERM or SIGINT, so services shut down cleanly."""
  stop = threading.Event()

  def handler(signum, _frame):
    logging.info("received %s, shutting down", signal.Signals(signum).name)
    stop.set()

  signal.signal(signal.SIGTERM, handler)
  signal.signal(signal.SIGINT, handler)
  return stop
