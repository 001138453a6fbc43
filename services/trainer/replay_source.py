"""The replay table as the trainer's learner sees it: batches out, priorities and deletions back.

A `ReplaySource` owns the Reverb client and the dataset (trainer/dataset.py)
and its iterator, which it rebuilds after a sampling timeout or error. It
checks the table is this environment's, explains why no batch comes, deletes
the invalid items sampling found and skips the ones Reverb cannot read,
counting both. What a Reverb error means is core/rl/replay_io.py's.

The learner only sees `iterator`, `prioritized` and `update_priorities`: a
source over several replay servers (sampling each in proportion to its size,
sending each update and deletion to the server its item came from) can take
this one's place.
"""

import logging
import math
import threading
import time

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.trainer.dataset import PROBLEMS, make_dataset

log = logging.getLogger(__name__)
UNREADABLE_LOG_EVERY_S = 60

BAD_ITEMS = metrics.counter(
  "trainer_bad_items_dropped",
  "Replay items with invalid values or shapes, left out of training and deleted from the table.",
)
UNREADABLE_ITEMS = metrics.counter(
  "trainer_unreadable_items_skipped",
  "Replay items of another dtype or column count, skipped (Reverb does not say which item, "
  "so FIFO removes them).",
)


class ReplaySource:
  """One replay server's table: the learner's batches, and what it learns about them."""

  def __init__(
    self,
    address: str,
    env_specs: specs.EnvSpecs,
    env_id: str,
    batch_size: int,
    prefetch_batches: int,
    stop: threading.Event,
  ):
    self.address, self.specs, self._env_id = address, env_specs, env_id
    self._batch_size, self._prefetch_batches = batch_size, prefetch_batches
    self._stop = stop
    self.client = reverb.Client(address)
    self.prioritized = False  # read from the table's sampler in connect()
    self.replay_size = -1
    self.fleet_env_steps = 0  # agent steps all collectors wrote (replay's insert count)
    self.bad_items_dropped = 0
    self.unreadable_items_skipped = 0
    self._unreadable_logged = -math.inf
    self._backoff = rpc.Backoff()
    self._tf_client = None
    self._dataset = None
    self.iterator = None

  def info(self):
    """The table's info from the server; also refreshes replay_size and fleet_env_steps."""
    info = self.client.server_info(timeout=5)
    if specs.TABLE not in info:
      raise RuntimeError(f"replay server at {self.address} has no table {specs.TABLE!r}")
    table = info[specs.TABLE]
    self.replay_size = table.current_size
    self.fleet_env_steps = table.rate_limiter_info.insert_stats.completed
    return table

  def connect(self) -> None:
    """Waits for the server; refuses to train on a table built for another environment."""
    table = rpc.retry(self.info, f"connecting to replay at {self.address}", self._stop)
    if table is None:
      return
    mismatch = specs.signature_mismatch(table.signature, self.specs)
    if mismatch:
      raise SystemExit(
        f"the replay table does not match this trainer's environment "
        f"{self._env_id} ({mismatch}); start both with the same --env-id, "
        "--frame-stack and --n-step"
      )
    self.prioritized = table.sampler_options.HasField("prioritized")
    if self.prioritized:
      self._tf_client = reverb.TFClient(self.address)

  def start(self) -> None:
    """Builds the dataset and its first iterator."""
    self._dataset = make_dataset(self.address, self.specs, self._batch_size, self._prefetch_batches)
    self.restart()

  def restart(self) -> None:
    """A new iterator: after a timeout or an error the old one is finished."""
    self.iterator = iter(self._dataset)

  def update_priorities(self, keys: tf.Tensor, priorities: tf.Tensor) -> None:
    """Inside the learner's graph: the sampled items' new priorities."""
    self._tf_client.update_priorities(specs.TABLE, keys, priorities)

  def after_step(self, result) -> None:
    """What a learner step found: invalid items are deleted, a timeout explained.

    `result` is the learner's StepResult.
    """
    self.drop_bad_items(result.problems)
    if result.timed_out:  # the steps that ran still count
      self.explain_wait()
      self.restart()
    if result.steps:
      self._backoff.reset()

  def recover(self, error: Exception) -> bool:
    """Handles an error the learner's sampling raised; False if it is not replay's (a bug).

    An item of another dtype is counted and skipped; a lost server is
    waited for with backoff. Either way sampling starts over.
    """
    if replay_io.is_unreadable_item(error):
      self._skip_unreadable_item(error.message)
    elif replay_io.is_sampler_unavailable(error):
      log.warning(
        "replay at %s unavailable (%s); retrying in %.1fs",
        self.address,
        error.message.splitlines()[0][:200],
        self._backoff.delay,
      )
      self._backoff.wait(self._stop)
    else:
      return False
    self.restart()
    return True

  def explain_wait(self) -> None:
    """Says why no batch came (called after a sampling timeout)."""
    try:
      table = self.info()
    except Exception as e:  # replay down: say so, the caller retries
      log.warning(
        "replay at %s unreachable (%s); retrying", self.address, str(e).splitlines()[0][:200]
      )
      return
    needed = table.rate_limiter_info.min_size_to_sample
    if table.current_size < needed:
      log.info(
        "waiting for data: replay holds %d of the %d transitions needed before training",
        table.current_size,
        needed,
      )
    else:
      log.info(
        "waiting for data: the rate limiter holds sampling until collectors insert more "
        "(replay holds %d)",
        table.current_size,
      )

  def drop_bad_items(self, problems: np.ndarray) -> None:
    """Deletes the invalid items sampling found, so they are never sampled again."""
    if not len(problems):
      return
    keys = sorted({int(key) for key in problems[:, 0].view(np.uint64)})
    try:
      self.client.mutate_priorities(specs.TABLE, deletes=keys)
    except Exception as e:  # replay down: they are left out again when sampled again
      log.warning(
        "could not delete %d invalid items from replay (%s)",
        len(keys),
        str(e).splitlines()[0][:200],
      )
    self.bad_items_dropped += len(keys)
    BAD_ITEMS.inc(len(keys))
    found = sorted({PROBLEMS[int(code)] for _, code in problems})
    log.warning(
      "left %d replay item(s) out of training and deleted them (%s; %d so far): "
      "some Reverb client wrote what no collector writes",
      len(keys),
      "; ".join(found),
      self.bad_items_dropped,
    )

  def _skip_unreadable_item(self, message: str) -> None:
    """Counts an item Reverb's sampler refused (another dtype or column count)."""
    self.unreadable_items_skipped += 1
    UNREADABLE_ITEMS.inc()
    now = time.monotonic()
    if now - self._unreadable_logged < UNREADABLE_LOG_EVERY_S:
      return  # a small table samples the same item again within seconds
    self._unreadable_logged = now
    reason = replay_io.unreadable_reason(message)
    log.error(
      "skipped a replay item that does not match the table signature (%s; %d so far). "
      "Reverb's error does not say which item, so it stays until FIFO removes it; "
      "some Reverb client wrote what no collector writes",
      reason.strip()[:300],
      self.unreadable_items_skipped,
    )
