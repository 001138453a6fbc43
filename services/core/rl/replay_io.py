"""Replay items through Reverb: the one module that knows Reverb's private API and error texts.

core/rl/specs.py declares the replay layout (what a row and an item hold, the
table signature). This module moves it through Reverb, in one place for the
collector, the trainer, the tests and the benchmarks:

  encode  `RowWriter`: appends rows and creates the items over them; which
          rows an item references is `ItemLayout`'s (the newest k+n frames,
          the newest n steps). The tests write through this writer too, so
          their oracle is the production writer.
  decode  `decode`: a sampled item's frames and packed steps -> the
          observations s_t and s_t+n and each step scalar in its own dtype.
  errors  `is_timeout`, `is_lost_server`, `is_sampler_unavailable`,
          `is_unreadable_item`: what a Reverb error means. dm-reverb 0.14
          raises RuntimeError for most failed gRPC statuses and says which
          only in the message text, so the text is matched here and nowhere
          else.

It relies on dm-reverb 0.14 (pinned in the lock file): its pybind
TrajectoryWriter, ConstantChunkerOptions and error messages.
tests/test_reverb_contract.py checks each of these against the installed
Reverb and says what changed when one does not hold.
"""

import collections
import dataclasses
from typing import NamedTuple

import numpy as np
import reverb
import tensorflow as tf
from reverb import pybind

from dqnfleet.core.rl import specs

# Long enough for any item (k+n rows) and for chunks that compress well.
KEEP_ALIVE_ROWS = 32
# Row columns go to the server in chunks of rows, each compressed on its
# own. The `step` column, which Reverb's auto-tuning would send as one chunk
# per row, costs one chunk per 32 rows (see docs/performance.md). Items wait
# for their chunks to fill, or for the flush that keeps in-flight items low.
CHUNK_ROWS = 32
# The `frame` column's chunk length, which a writer may set apart
# (ItemLayout). A sampler decompresses every chunk an item touches, whole:
# (C + 6) frames for a 7-frame item with chunks of C rows. Yet 16, 8 or 4
# rows did not make the trainer's input path measurably cheaper, while they
# cost replay memory (1,411 B per Breakout transition at 32 rows, 1,823 at 4;
# bench/sample_throughput.py, docs/performance.md), so it stays 32.
FRAME_CHUNK_ROWS = 32
# How the C++ writer words a deadline that passed (Flush, EndEpisode);
# Reverb's own Python writer matches the same text.
TIMEOUT_TEXT = "Timeout exceeded"


@dataclasses.dataclass(frozen=True)
class ItemLayout:
  """Which of a writer's newest rows an item references (specs.py explains why)."""

  stack: int  # frames per observation (1: state vectors)
  n_step: int  # transitions per item
  frame_chunk_rows: int = FRAME_CHUNK_ROWS  # rows per chunk of the frame column

  @classmethod
  def of(cls, env_specs: specs.EnvSpecs) -> "ItemLayout":
    return cls(env_specs.stack, env_specs.n_step)

  @property
  def frame_rows(self) -> int:
    """Rows whose frame an item references: those of s_t ... s_t+n."""
    return self.stack + self.n_step

  @property
  def step_rows(self) -> int:
    """Rows whose packed step an item references: those of a_t, r_t ... r_t+n-1."""
    return self.n_step


class RowWriter:
  """One environment's rows in the replay layout, and the items over them.

  Reverb's Python TrajectoryWriter flattens a nested structure and rebuilds
  its column history on every append and item: for our two fixed columns
  that costs more than the append itself. This drives the C++ writer under
  it directly and keeps the newest references itself, which halves the
  observer's time per step (bench/collector_throughput.py). It relies on
  dm-reverb 0.14's pybind writer (pinned in the lock file); with `validate`
  the C++ side still checks every item against the table's signature (off
  only for tests that play a client which skips those checks).
  """

  def __init__(self, client: reverb.Client, layout: ItemLayout, *, validate: bool = True):
    keep_alive = max(KEEP_ALIVE_ROWS, layout.frame_rows)
    options = pybind.ConstantChunkerOptions(
      max_chunk_length=CHUNK_ROWS, num_keep_alive_refs=keep_alive
    )
    self._writer = client._client.NewTrajectoryWriter(options, validate)
    if layout.frame_chunk_rows != CHUNK_ROWS:
      frames = pybind.ConstantChunkerOptions(
        max_chunk_length=layout.frame_chunk_rows, num_keep_alive_refs=keep_alive
      )
      self._writer.ConfigureChunker(specs.ROW_COLUMNS.index("frame"), frames)
    # The references of the newest rows, as many as an item takes: an item
    # is all of them (ItemLayout).
    self._frames = collections.deque(maxlen=layout.frame_rows)
    self._steps = collections.deque(maxlen=layout.step_rows)

  def append(self, frame: np.ndarray, step: np.ndarray) -> None:
    frame_ref, step_ref = self._writer.Append([frame, step])  # specs.ROW_COLUMNS' order
    self._frames.append(frame_ref)
    self._steps.append(step_ref)

  def create_item(self, priority: float = 1.0) -> None:
    """The item whose last row is the newest appended one (columns in the signature's order)."""
    self._writer.CreateItem(
      specs.TABLE, priority, [list(self._frames), list(self._steps)], [False, False]
    )

  def flush(self, block_until_num_items: int, timeout_ms: int) -> None:
    """Waits until at most `block_until_num_items` items are pending; DeadlineExceededError after
    `timeout_ms` (the rate limiter holds inserts back, or the server is slow or gone)."""
    self._call(self._writer.Flush, block_until_num_items, timeout_ms)

  def end_episode(self, timeout_ms: int) -> None:
    self._frames.clear()
    self._steps.clear()
    self._call(self._writer.EndEpisode, True, timeout_ms)  # clears the writer's buffers

  def close(self) -> None:
    self._writer.Close()

  @staticmethod
  def _call(method, *args) -> None:
    try:
      method(*args)
    except RuntimeError as e:  # how the C++ writer reports a timeout
      if is_timeout(e):
        raise reverb.errors.DeadlineExceededError(str(e)) from None
      raise


class Transitions(NamedTuple):
  """A batch of sampled items, decoded: what an n-step target reads, nothing more."""

  first: tf.Tensor  # [B, *observation]: s_t
  last: tf.Tensor  # [B, *observation]: s_t+n
  step: dict[str, tf.Tensor]  # each of specs.STEP_FIELDS, [B, n], in its own dtype


def observation(frames: tf.Tensor, stack: int, start: int) -> tf.Tensor:
  """[B, k+n, *frame] -> the observation whose oldest frame is row `start`, [B, *obs]."""
  # Observations stack their frames first, as the rows hold them: a slice, no interleave.
  return frames[:, start] if stack == 1 else frames[:, start : start + stack]


def decode(data: dict, stack: int) -> Transitions:
  """A batch of items as sampled (`frames`, `step` columns) -> s_t, s_t+n and the step scalars.

  Only the two observations an n-step target reads are assembled: the n-1
  between them would cost a copy of k frames each and never be read.
  """
  frames = data["frames"]
  n = frames.shape[1] - stack
  return Transitions(
    observation(frames, stack, 0), observation(frames, stack, n), specs.unpack_step(data["step"])
  )


def is_timeout(e: BaseException) -> bool:
  """A writer call's deadline passed: the rate limiter holds inserts back, or the server is
  slow or gone (the writer cannot tell which: it retries an unreachable server until then)."""
  if isinstance(e, reverb.errors.DeadlineExceededError):
    return True
  return isinstance(e, RuntimeError) and TIMEOUT_TEXT in str(e)


def is_lost_server(e: BaseException) -> bool:
  """A writer's or client's call failed because the replay server is gone or broke the stream.

  Reverb's pybind layer raises RuntimeError for every failed gRPC status
  but a few (those become ValueError, IndexError, NotImplementedError), and
  DeadlineExceededError for calls with a deadline; nothing finer tells a
  lost server apart, so the collector reconnects on any of these.
  """
  return isinstance(e, (RuntimeError, reverb.errors.ReverbError))


def is_sampler_unavailable(e: BaseException) -> bool:
  """The trainer's dataset lost its server: down, restarting, or the stream was cancelled."""
  return isinstance(
    e, (tf.errors.UnavailableError, tf.errors.InternalError, tf.errors.CancelledError)
  )


def is_unreadable_item(e: BaseException, table: str = specs.TABLE) -> bool:
  """The sampler refused an item whose dtypes or column count are not the table signature's.

  Anything else that raises InvalidArgumentError is not the replay's data
  but a bug, and must not be skipped.
  """
  return isinstance(e, tf.errors.InvalidArgumentError) and f"from table '{table}'" in (
    e.message or ""
  )


def unreadable_reason(message: str) -> str:
  """The line of the sampler's error that says what did not match."""
  return next((line for line in message.splitlines() if "from table" in line), message)
