"""The replay shards as the trainer's learner sees them: batches out, priorities and deletions back.

A `ReplaySource` owns a Reverb client per replay server (shard), the dataset
that mixes them (trainer/dataset.py) and its iterator, which it rebuilds
after a sampling timeout or error and whenever a shard is lost or comes back.
It checks every shard's table is this environment's, explains why no batch
comes, deletes the invalid items sampling found from the shard that holds
them and skips the ones Reverb cannot read, counting both. What a Reverb
error means is core/rl/replay_io.py's.

Mixing, as Ape-X shards its replay: each item comes from shard s with
probability size_s / N (N: the items of the shards sampled from), then from
that shard's own sampler. Uniform replay stays uniform over the union;
prioritized replay samples by priority within a shard and shards by size.
The importance weights need nothing from the other shards:
N * P(i) = N * (size_s / N) * p_s(i) = table_size * probability, both of
which the shard reports with the item. A shard below its table's minimum
size has weight 0 until it fills. Each shard's rate limiter still holds
sampling back, and a shard that holds it back holds back the whole mix.

A thread asks every shard for its table every PROBE_EVERY_S seconds: the
sizes become the mix's weights (a variable the dataset reads as it runs: no
Python inside tf.data), and a shard that stops answering is lost. Reverb's
sampler waits for a lost server without an error, so a learner call waiting
on one is cancelled (`sampling`) and sampling goes on from the shards that
answer; a lost shard that answers again rejoins the same way. With every
shard lost the source waits with backoff, as it does for one server. With
several shards, each one's priority updates and deletions are sent by a
`Sender` of its own, so that a lost shard holds up none of the others.

With an input service (trainer/input_service.py) the same dataset runs on
its workers, which stream finished batches; nothing else here changes.

The learner only sees `iterator`, `prioritized` and
`update_priorities(keys, priorities, shards)`.
"""

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent import futures

import numpy as np
import reverb
import tensorflow as tf

# TensorFlow's own way to cancel a running function call (tf.distribute's
# coordinator uses it); no public API stops an iterator that waits.
from tensorflow.python.eager import cancellation

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.trainer.dataset import KEY, PROBLEM, PROBLEMS, SHARD, make_sharded_dataset
from dqnfleet.trainer.input_service import Dispatcher

log = logging.getLogger(__name__)
UNREADABLE_LOG_EVERY_S = 60
PROBE_EVERY_S = 2.0
# A shard sampled from may take this long to answer before it counts as lost:
# checkpointing a full table holds it for up to 2.5 s (docs/replay.md).
LIVE_TIMEOUT_S = 5
LOST_TIMEOUT_S = 2  # a lost shard (or one not reached yet) is asked briefly
SEND_EVERY_S = 0.1  # how often each shard's sender sends what the learner queued
# Priority updates queued for one shard; while it is lost, newer ones are dropped.
PRIORITY_BACKLOG = 100_000

BAD_ITEMS = metrics.counter(
  "trainer_bad_items_dropped",
  "Replay items with invalid values or shapes, left out of training and deleted from the table.",
)
UNREADABLE_ITEMS = metrics.counter(
  "trainer_unreadable_items_skipped",
  "Replay items of another dtype or column count, skipped (Reverb does not say which item, "
  "so FIFO removes them).",
)
SHARDS = metrics.gauge("trainer_replay_shards", "Replay shards (servers) the trainer was given.")
SHARDS_UP = metrics.gauge(
  "trainer_replay_shards_up", "Replay shards that answer with a table that fits: sampled from."
)
SHARD_UP = metrics.gauge(
  "trainer_replay_shard_up", "1 while this replay shard is sampled from, else 0.", ["shard"]
)


@dataclasses.dataclass(eq=False)
class Shard:
  """One replay server, and what its newest answer said of its table."""

  index: int
  address: str
  client: reverb.Client
  up: bool = False  # answered its newest probe with a table that fits: sampled from
  size: int = -1  # items in its table (-1: it never answered); kept while it is lost
  inserted: int = 0  # its insert count
  min_size: int = 1  # items it needs before it may be sampled
  error: str = ""  # why its newest probe failed
  refused: str = ""  # why its table is kept out of training ("" if it is not)
  tf_client: reverb.TFClient | None = None  # for priority updates (prioritized replay)
  sender: "Sender | None" = None  # its updates and deletions, with several shards

  @property
  def weight(self) -> float:
    """Its share of the mix: its size once it may be sampled, else 0."""
    return float(self.size) if self.up and self.size >= max(self.min_size, 1) else 0.0


class ReplaySource:
  """Replay shards' tables: the learner's batches, and what it learns about them."""

  def __init__(
    self,
    addresses: Sequence[str],
    env_specs: specs.EnvSpecs,
    env_id: str,
    batch_size: int,
    prefetch_batches: int,
    gamma: float,
    sampling_workers: int,
    stop: threading.Event,
    input_service: Dispatcher | None = None,
  ):
    self.specs, self._env_id = env_specs, env_id
    self.input_service = input_service  # its workers build the batches, if given
    self._batch_size, self._prefetch_batches = batch_size, prefetch_batches
    self._gamma = gamma  # the n-step targets' discount, applied as items are batched
    self._sampling_workers = sampling_workers
    self._stop = stop
    self.shards = [Shard(i, a, reverb.Client(a)) for i, a in enumerate(addresses)]
    self.where = ", ".join(addresses)  # for log lines: one address, as before shards
    self.prioritized = False  # read from the tables' sampler in connect()
    self.bad_items_dropped = 0
    self.unreadable_items_skipped = 0
    self._unreadable_logged = -math.inf
    self._backoff = rpc.Backoff()
    self._outage = rpc.Outage(log)  # while no shard answers
    self._weights = tf.Variable(
      tf.zeros([len(self.shards)]), trainable=False, name="replay_shard_weights"
    )
    self._lock = threading.Lock()  # shard transitions and the call in flight
    self._probes = futures.ThreadPoolExecutor(len(self.shards), thread_name_prefix="replay-probe")
    self._closed = threading.Event()
    self._watcher: threading.Thread | None = None
    self._in_flight: cancellation.CancellationManager | None = None
    self._in_flight_since = 0.0  # when the learner's call in flight began
    self._mixed: tuple[int, ...] = ()  # the shards the dataset samples from
    self._dataset = None
    self.iterator = None
    SHARDS.set(len(self.shards))
    self._count_up()

  @property
  def replay_size(self) -> int:
    """Items in all shards at their newest answers; -1 before any shard answered."""
    known = [s.size for s in self.shards if s.size >= 0]
    return sum(known) if known else -1

  @property
  def fleet_env_steps(self) -> int:
    """Agent steps all collectors wrote: the shards' insert counts."""
    return sum(s.inserted for s in self.shards)

  @property
  def shards_up(self) -> int:
    return sum(s.up for s in self.shards)

  def reached(self) -> bool:
    """Whether a shard ever answered."""
    return self.replay_size >= 0

  def all_up(self) -> bool:
    return all(s.up for s in self.shards)

  def connect(self) -> None:
    """Waits until a shard answers; refuses tables built for another environment or sampler.

    Shards that do not answer yet join when they do.
    """
    answered = rpc.retry(self._reach, f"connecting to replay at {self.where}", self._stop)
    if answered is None:
      return
    for shard, table in answered:
      mismatch = specs.signature_mismatch(table.signature, self.specs)
      if mismatch:
        raise SystemExit(
          f"the replay table {self._at(shard)}does not match this trainer's environment "
          f"{self._env_id} ({mismatch}); start both with the same --env-id, "
          "--frame-stack and --n-step"
        )
    kinds = {shard.address: _prioritized(table) for shard, table in answered}
    if len(set(kinds.values())) > 1:
      raise SystemExit(
        "replay shards sample differently ("
        + ", ".join(f"{a}: {'prioritized' if p else 'uniform'}" for a, p in kinds.items())
        + "); start every shard with the same --prioritized"
      )
    self.prioritized = next(iter(kinds.values()))
    for shard in self.shards:
      if self.prioritized:
        shard.tf_client = reverb.TFClient(shard.address)
      if len(self.shards) > 1:
        shard.sender = Sender(shard, self._closed)
    for shard, table in answered:
      self._observe(shard, table)
    missing = [s.address for s in self.shards if not s.up]
    if missing:
      log.warning(
        "replay shard(s) %s not answering yet; sampling from the %d that do, the others "
        "join when they answer",
        ", ".join(missing),
        self.shards_up,
      )

  def start(self) -> None:
    """Builds the dataset and its first iterator, and starts watching the shards."""
    self._weights.assign([s.weight for s in self.shards])
    self.restart()
    self._watcher = threading.Thread(target=self._watch, name="replay-shards", daemon=True)
    self._watcher.start()
    for shard in self.shards:
      if shard.sender:
        shard.sender.start()

  def close(self) -> None:
    """Stops watching the shards and sending them updates."""
    self._closed.set()
    if self._watcher:
      self._watcher.join()
    self._probes.shutdown(wait=False)

  def restart(self) -> None:
    """A new iterator (after a timeout or an error the old one is finished), over the shards
    that answer; over all of them while none does."""
    mix = self._target()
    if self._dataset is None or mix != self._mixed:
      addresses = {i: self.shards[i].address for i in mix}
      self._dataset = make_sharded_dataset(
        addresses,
        self._weights,
        self.specs,
        self._batch_size,
        self._prefetch_batches,
        self._gamma,
        self._sampling_workers,
        self.input_service.target if self.input_service else "",
      )
      self._mixed = mix
    old = [self.iterator] if self.iterator is not None else []
    self.iterator = iter(self._dataset)
    _discard(old)

  @contextlib.contextmanager
  def sampling(self):
    """Around the learner's call: the watcher cancels it when it waits on a lost shard.

    A cancelled call raises CancelledError, which `recover` takes for a lost
    server. TensorFlow's cancellation context is the process's: a function
    another thread calls meanwhile shares it, which matters only at the
    instant of a cancel (the trainer's other threads serve files and write
    summaries, outside functions).
    """
    manager = cancellation.CancellationManager()
    with self._lock:
      self._in_flight = manager
      self._in_flight_since = time.monotonic()
    try:
      with cancellation.CancellationManagerContext(manager):
        yield
    finally:
      with self._lock:
        self._in_flight = None

  def update_priorities(self, keys: tf.Tensor, priorities: tf.Tensor, shards: tf.Tensor) -> None:
    """Inside the learner's graph: the sampled items' new priorities, each to its shard (queued
    for its sender, with several)."""
    if len(self.shards) == 1:
      self.shards[0].tf_client.update_priorities(specs.TABLE, keys, priorities)
      return
    for shard in self.shards:
      mine = tf.equal(shards, shard.index)
      shard.sender.queue_priorities(tf.boolean_mask(keys, mine), tf.boolean_mask(priorities, mine))

  def after_step(self, result) -> None:
    """What a learner step found: invalid items are deleted, a timeout explained.

    `result` is the learner's StepResult. A shard that joined or was lost
    meanwhile changes the mix now.
    """
    self.drop_bad_items(result.problems)
    if result.timed_out:  # the steps that ran still count
      self.explain_wait()
      self.restart()
    elif self._target() != self._mixed:
      self.restart()
    if result.steps:
      self._backoff.reset()

  def recover(self, error: Exception) -> bool:
    """Handles an error the learner's sampling raised; False if it is not replay's (a bug).

    An item of another dtype is counted and skipped. A lost shard is left
    out at once while another answers; with none answering, they are waited
    for with backoff. Either way sampling starts over.
    """
    if replay_io.is_unreadable_item(error):
      self._skip_unreadable_item(error.message)
    elif replay_io.is_sampler_unavailable(error):
      if self._stop.is_set():  # cancelled so that the trainer stops
        return True
      self._wait_for_a_shard(rpc.first_line(error))
    else:
      return False
    self.restart()
    return True

  def explain_wait(self) -> None:
    """Says why no batch came (called after a sampling timeout)."""
    self.probe()
    live = [s for s in self.shards if s.up]
    if len(self.shards) == 1 and not live:  # replay down: say so, the caller retries
      error = self.shards[0].error
      self._outage.failed(f"replay at {self.where} unreachable ({error}); retrying", error)
    # Shards below their minimum are left out of the mix, unless no shard is above it.
    for shard in [s for s in live if s.weight] or live:
      where = "replay" if len(self.shards) == 1 else f"replay shard at {shard.address}"
      if shard.size < shard.min_size:
        log.info(
          "waiting for data: %s holds %d of the %d transitions needed before training",
          where,
          shard.size,
          shard.min_size,
        )
      else:
        log.info(
          "waiting for data: the rate limiter holds sampling until collectors insert more "
          "(%s holds %d)",
          where,
          shard.size,
        )

  def drop_bad_items(self, problems: np.ndarray) -> None:
    """Deletes the invalid items sampling found from their shards, so they are never sampled
    again."""
    if not len(problems):
      return
    keys = problems[:, KEY].view(np.uint64)
    dropped = 0
    for index in sorted({int(i) for i in problems[:, SHARD]}):
      shard = self.shards[index]
      doomed = sorted({int(key) for key in keys[problems[:, SHARD] == index]})
      if shard.sender:
        shard.sender.delete(doomed)
      else:
        _delete(shard, doomed)
      dropped += len(doomed)
    self.bad_items_dropped += dropped
    BAD_ITEMS.inc(dropped)
    found = sorted({PROBLEMS[int(code)] for code in problems[:, PROBLEM]})
    log.warning(
      "left %d replay item(s) out of training and deleted them (%s; %d so far): "
      "some Reverb client wrote what no collector writes",
      dropped,
      "; ".join(found),
      self.bad_items_dropped,
    )

  def probe(self) -> None:
    """Asks every shard for its table at once; refreshes sizes, counts and the mix's weights."""
    list(self._probes.map(self._probe, self.shards))
    self._weights.assign([s.weight for s in self.shards])

  def _watch(self) -> None:
    while not self._closed.wait(PROBE_EVERY_S) and not self._stop.is_set():
      try:
        self.probe()
      except RuntimeError:  # no new probe threads: the interpreter exits (never closed)
        return
      if self.input_service:
        with self._lock:
          since = self._in_flight_since if self._in_flight is not None else None
        self.input_service.watch(None if since is None else time.monotonic() - since)
      if self._mix_waits_on_a_lost_shard():
        self._cancel()
    self._cancel()  # a call that waits on a lost shard must not hold up the stop

  def _mix_waits_on_a_lost_shard(self) -> bool:
    return not all(self.shards[i].up for i in self._mixed)

  def _cancel(self) -> None:
    with self._lock:
      if self._in_flight is not None:
        self._in_flight.start_cancel()

  def _target(self) -> tuple[int, ...]:
    """The shards to sample from: those that answer; all of them while none does."""
    return tuple(s.index for s in self.shards if s.up) or tuple(range(len(self.shards)))

  def _reach(self) -> list[tuple[Shard, object]]:
    """(shard, its table) of every shard that answers; raises if none does."""
    results = list(self._probes.map(self._ask, self.shards))
    answered = [(s, r) for s, r in zip(self.shards, results, strict=True) if r is not None]
    if not answered:
      raise RuntimeError(self._errors())
    return answered

  def _ask(self, shard: Shard):
    """The shard's table, None if it does not answer (why: shard.error)."""
    try:
      info = shard.client.server_info(timeout=LIVE_TIMEOUT_S if shard.up else LOST_TIMEOUT_S)
      if specs.TABLE not in info:
        raise RuntimeError(f"replay server at {shard.address} has no table {specs.TABLE!r}")
    except Exception as e:  # down, or not up yet: the caller says so
      shard.error = rpc.first_line(e)
      return None
    return info[specs.TABLE]

  def _probe(self, shard: Shard) -> None:
    self._observe(shard, self._ask(shard))

  def _observe(self, shard: Shard, table) -> None:
    """Records a shard's answer (None: none); logs when it is lost, joins or is refused."""
    refused = self._refusal(table) if table is not None else ""
    with self._lock:
      was_up, was_refused, known = shard.up, shard.refused, shard.size >= 0
      if table is not None:
        shard.refused = refused
      if table is not None and not refused:  # a refused table is not this fleet's
        shard.size = table.current_size
        shard.inserted = table.rate_limiter_info.insert_stats.completed
        shard.min_size = table.rate_limiter_info.min_size_to_sample
      shard.up = table is not None and not refused
      up, total = self.shards_up, len(self.shards)
    if refused and refused != was_refused:
      log.error("left replay shard at %s out of training: %s", shard.address, refused)
    self._count_up()
    if shard.up and not was_up:
      self._outage.over(f"replay at {shard.address} answers again")
    if total == 1 or shard.up == was_up:
      return  # one server: the sampling path says what it waits for
    if shard.up:
      log.info(
        "replay shard at %s answers%s (%d items); sampling from %d of %d shards",
        shard.address,
        " again" if known else "",
        shard.size,
        up,
        total,
      )
    else:
      log.warning(
        "lost replay shard at %s (%s); %s",
        shard.address,
        refused or shard.error,
        f"training on from {up} of {total} shards" if up else "no shard answers",
      )

  def _refusal(self, table) -> str:
    """Why a table that answers cannot be sampled with the others ("" if it can)."""
    mismatch = specs.signature_mismatch(table.signature, self.specs)
    if mismatch:
      return f"its table does not match this trainer's environment {self._env_id} ({mismatch})"
    if _prioritized(table) != self.prioritized:
      kind = lambda p: "by priority" if p else "uniformly"
      return (
        f"its table samples {kind(not self.prioritized)}, the others "
        f"{kind(self.prioritized)}; start every shard with the same --prioritized"
      )
    return ""

  def _count_up(self) -> None:
    SHARDS_UP.set(self.shards_up)
    for shard in self.shards:
      SHARD_UP.labels(shard=shard.address).set(int(shard.up))

  def _wait_for_a_shard(self, error: str) -> None:
    """After sampling lost a server: on at once from the others if one was lost, else (one
    server, or none answers) with backoff."""
    moved = lambda: self.shards_up and self._target() != self._mixed
    if not moved():
      self.probe()  # the watcher may not have asked since
    if moved():
      return  # the loss is logged
    while not self._stop.is_set():
      # What the probes found says more than a graph's error, if they found anything.
      reason = self._errors() or error
      self._outage.failed(
        f"replay at {self.where} unavailable ({reason}); retrying in {self._backoff.delay:.1f}s",
        reason,
      )
      if self._backoff.wait(self._stop):
        return
      self.probe()
      if self.shards_up:
        return

  def _errors(self) -> str:
    """Why the shards that are not sampled from are not."""
    down = [s for s in self.shards if not s.up]
    if len(self.shards) == 1:
      return "; ".join(s.refused or s.error for s in down)
    return "; ".join(f"{s.address}: {s.refused or s.error}" for s in down)

  def _at(self, shard: Shard) -> str:
    return "" if len(self.shards) == 1 else f"at {shard.address} "

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


class Sender:
  """One shard's priority updates and deletions, sent by a thread of its own.

  Reverb's priority update (TFClient's, and Client.mutate_priorities) waits
  for a lost server as long as it takes, and nothing cancels it: sent from
  the learner's graph, the first update to a shard just lost would stop
  training on all of them. The graph queues its updates here and never
  waits; a lost shard's backlog stops growing at PRIORITY_BACKLOG (newer
  updates are dropped: those items keep their priorities) and is sent when
  it answers again.
  """

  def __init__(self, shard: Shard, closed: threading.Event):
    self._shard, self._closed = shard, closed
    self._deletes: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
    self._priorities = (
      tf.queue.FIFOQueue(PRIORITY_BACKLOG, [tf.int64, tf.float64], shapes=[[], []])
      if shard.tf_client
      else None
    )
    self._thread = threading.Thread(
      target=self._run, name=f"replay-shard-{shard.index}-sender", daemon=True
    )

  def start(self) -> None:
    self._thread.start()

  def queue_priorities(self, keys: tf.Tensor, priorities: tf.Tensor) -> None:
    """Inside the learner's graph: queues new priorities, or drops them if there is no room."""
    room = PRIORITY_BACKLOG - self._priorities.size()
    tf.cond(
      tf.size(keys) <= room,
      lambda: self._priorities.enqueue_many([tf.bitcast(keys, tf.int64), priorities]),
      tf.no_op,
    )

  def delete(self, keys: list[int]) -> None:
    self._deletes.put(keys)

  def _run(self) -> None:
    while not self._closed.wait(SEND_EVERY_S):
      if not self._shard.up:  # kept for when it answers: sent now, it would wait for it
        continue
      while not self._deletes.empty():
        _delete(self._shard, self._deletes.get())
      # The only reader: what size() counts is there to take.
      queued = int(self._priorities.size()) if self._priorities is not None else 0
      if queued:
        keys, priorities = self._priorities.dequeue_many(queued)
        try:
          self._shard.tf_client.update_priorities(
            specs.TABLE, tf.bitcast(keys, tf.uint64), priorities
          )
        except Exception as e:  # the items keep their priorities
          log.warning(
            "could not update %d priorities in replay shard at %s (%s)",
            queued,
            self._shard.address,
            rpc.first_line(e),
          )


def _discard(held: list) -> None:
  """Lets go of the iterators in `held`, its only references, in a thread of its own.

  Destroying a tf.data iterator waits for its autotuning thread, which was
  seen to keep the trainer's loop waiting for seconds after a shard
  rejoined (in RootDataset::Iterator's destructor, under TF 2.15).
  """
  if held:
    threading.Thread(target=held.clear, name="iterator-discard", daemon=True).start()


def _delete(shard: Shard, keys: list[int]) -> None:
  try:
    shard.client.mutate_priorities(specs.TABLE, deletes=keys)
  except Exception as e:  # they are left out again when sampled again
    log.warning(
      "could not delete %d invalid items from replay at %s (%s)",
      len(keys),
      shard.address,
      rpc.first_line(e),
    )


def _prioritized(table) -> bool:
  return table.sampler_options.HasField("prioritized")
