"""The observer: writes each environment's transitions into the replay shards.

One Reverb trajectory writer per environment (core/rl/replay_io.py's
RowWriter), rows and items laid out as core/rl/specs.py describes (each frame
stored once). It is a TF-Agents *transition* observer: the driver hands it
(s_t, a_t, s_t+1) for all environments at once, and the Q-values of s_t+1.

Shards: each environment writes its episodes to one replay server, its home
shard ((env index + collector) mod shards), so a collector's writes spread
over all of them. A shard that stops answering is left: its environments
move to the shards that still answer, starting their replay episode afresh
from the current observation (the game goes on), and go home at the start of
an episode once the shard answers again. Only with every shard gone does the
collector reconnect (ReplayLost).

Priorities: every item is inserted with the priority of its n-step TD error
under the collect policy's network (core/rl/priorities.py), once the trainer's
TD target settings are known (`td_target`, from the published policy); before
that, with priority 1.0.
"""

import logging
import time

import numpy as np
import reverb
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl import priorities, replay_io, specs
from dqnfleet.core.transport import metrics, rpc

log = logging.getLogger(__name__)

# Items a writer may have pending (waiting for their chunk to fill, or sent
# and not yet confirmed); beyond this the collector waits, so a rate-limited
# replay slows collection instead of letting items pile up in memory. Above
# replay_io.CHUNK_ROWS + n_step, so that the check never cuts a chunk short:
# it only waits for the server.
MAX_IN_FLIGHT_ITEMS = 2 * replay_io.CHUNK_ROWS
# Each writer checks that bound every few steps, not at every one: a flush
# call costs as much as an append (bench/collector_throughput.py).
BACKPRESSURE_EVERY = 8
# How long a writer call waits before the collector asks why (rate limiter,
# or a server that no longer answers: lost after WAIT_TIMEOUT_MS + ASK_TIMEOUT_S).
WAIT_TIMEOUT_MS = 5_000
ASK_TIMEOUT_S = 3
# Priority of items written before the trainer's TD target is known.
DEFAULT_PRIORITY = 1.0

REPLAY_WAIT = metrics.counter(
  "collector_replay_wait_seconds",
  "Seconds spent waiting for replay to take items (rate limiter or a slow server).",
)
INITIAL_PRIORITY = metrics.histogram(
  "collector_initial_priority",
  "Priority items were inserted with: |n-step TD error| under the acting network.",
  buckets=(0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
)
SHARDS_UP = metrics.gauge(
  "collector_replay_shards_up", "Replay shards this collector is writing to (of all it was given)."
)


class ReplayLost(RuntimeError):
  """A replay server stopped answering (replay_io.is_lost_server)."""

  def __init__(self, message: str, shard: int = -1):
    super().__init__(message)
    self.shard = shard


class Stopped(Exception):
  """The collector was asked to stop while waiting for the replay server."""


class ReplayObserver:
  """Turns batched transitions into replay items, one writer per environment."""

  def __init__(
    self,
    clients: list[reverb.Client],
    env_specs: specs.EnvSpecs,
    num_envs: int,
    policy_version,
    stop,
    source: int,
    *,
    addresses: list[str] | None = None,
    up: list[bool] | None = None,
    layout: replay_io.ItemLayout | None = None,
  ):
    """`up`: which of `clients` answered (default all); the others are tried again by
    `shard_back`. `layout`: the rows' chunking (default the environment's own; benchmarks
    try others)."""
    self._clients, self._stop = clients, stop
    self._addresses = addresses or [f"shard {s}" for s in range(len(clients))]
    self._up = list(up) if up is not None else [True] * len(clients)
    if not any(self._up):
      raise ReplayLost("no replay shard answers")
    self._source = source
    self._specs = env_specs
    self._policy_version = policy_version  # callable: version acting right now
    self._layout = layout or replay_io.ItemLayout.of(env_specs)
    self._home = [(i + source) % len(clients) for i in range(num_envs)]
    self._shard = [self._live_shard(i) for i in range(num_envs)]
    self._writers = [self._writer(s) for s in self._shard]
    # An environment whose writer changed shard mid-episode starts its
    # replay episode again from its current observation.
    self._restart = [False] * num_envs
    # Transitions of each environment's episode so far: an n-step item needs n.
    self._episode_steps = [0] * num_envs
    # The newest n rows' reward, discount and Q(s, a) of each environment,
    # oldest first: what its next item's TD error is computed from (they
    # follow the writer's rows exactly, start and padding rows included).
    n = env_specs.n_step
    self._rewards = np.zeros((num_envs, n))
    self._discounts = np.ones((num_envs, n))
    self._q_taken = np.zeros((num_envs, n))
    self.td_target: priorities.TdTarget | None = None  # set by the collector
    self._calls = 0
    self.items_written = 0
    self.steps_observed = 0
    SHARDS_UP.set(sum(self._up))

  @property
  def shards_up(self) -> int:
    return sum(self._up)

  def __call__(self, transition, next_q_values: np.ndarray | None) -> None:
    """Writes a batch of transitions; `next_q_values` [E, A] are Q(s_t+1) (None: unknown,
    the items of this call get DEFAULT_PRIORITY)."""
    time_step, action_step, next_time_step = transition
    version = self._policy_version()
    epsilons = action_step.info["epsilon"]
    actions = np.asarray(action_step.action)
    # What every environment appends, packed once for all of them.
    frames = self._specs.newest_frames(next_time_step.observation)
    steps = specs.pack_steps(
      actions, next_time_step.reward, next_time_step.discount, version, self._source, epsilons
    )
    step_types = time_step.step_type
    active = step_types != ts.StepType.LAST  # the LAST -> FIRST step carries no transition
    starting = (step_types == ts.StepType.FIRST) | np.array(self._restart)
    q_taken = np.take_along_axis(action_step.info["q_values"], actions[:, None], axis=1)[:, 0]
    self._start_rows(starting & active)
    self._shift(active, next_time_step.reward, next_time_step.discount, q_taken)
    item_priorities = (
      self._priorities(next_q_values.max(axis=-1))
      if next_q_values is not None
      else np.full(len(active), DEFAULT_PRIORITY)
    )
    ends = (next_time_step.step_type == ts.StepType.LAST).tolist()
    self._calls += 1
    for i in np.flatnonzero(active):
      try:
        self._observe(i, time_step, frames[i], steps[i], item_priorities[i], ends[i], epsilons[i])
      except Stopped:
        raise
      except Exception as e:
        if not replay_io.is_lost_server(e):
          raise
        self._lose(getattr(e, "shard", self._shard[i]), e)
    self.steps_observed += int(active.sum())

  def _observe(self, i, time_step, frame, step, item_priority, ends, epsilon) -> None:
    writer = self._writers[i]
    if time_step.step_type[i] == ts.StepType.FIRST or self._restart[i]:
      if time_step.step_type[i] == ts.StepType.FIRST:
        writer = self._go_home(i)
      self._restart[i] = False
      self._episode_steps[i] = 0
      for start_frame in self._specs.frames_of(time_step.observation[i]):
        writer.append(**specs.row(start_frame, 0, 0, 1, -1, self._source))
    writer.append(frame, step)
    self._episode_steps[i] += 1
    n = self._specs.n_step
    if self._episode_steps[i] >= n:
      self._create_item(writer, item_priority)
    if ends:
      # The episode's last n-1 transitions still wait for their items.
      padding = specs.padding_row(frame, self._policy_version(), self._source, epsilon)
      for _ in range(min(n - 1, self._episode_steps[i])):
        writer.append(**padding)
        self._shift_one(i, 0.0, 0.0, 0.0)
        self._create_item(writer, self._priorities(np.zeros(1), [i])[0])
      self._wait(i, lambda: writer.end_episode(timeout_ms=WAIT_TIMEOUT_MS))
    elif (self._calls + i) % BACKPRESSURE_EVERY == 0:  # writers take turns
      self._wait(i, lambda: writer.flush(MAX_IN_FLIGHT_ITEMS, WAIT_TIMEOUT_MS))

  def _create_item(self, writer: replay_io.RowWriter, item_priority: float) -> None:
    writer.create_item(item_priority)
    INITIAL_PRIORITY.observe(item_priority)
    self.items_written += 1

  # The TD error registers, vectorized over the environments.

  def _start_rows(self, mask: np.ndarray) -> None:
    """Start rows (k frames, reward 0, discount 1) fill the registers of `mask`'s environments."""
    self._rewards[mask], self._discounts[mask], self._q_taken[mask] = 0.0, 1.0, 0.0

  def _shift(self, mask, rewards, discounts, q_taken) -> None:
    """One row appended by each of `mask`'s environments."""
    for register, value in (
      (self._rewards, rewards),
      (self._discounts, discounts),
      (self._q_taken, q_taken),
    ):
      register[mask, :-1] = register[mask, 1:]
      register[mask, -1] = np.asarray(value)[mask]

  def _shift_one(self, i: int, reward: float, discount: float, q: float) -> None:
    for register, value in (
      (self._rewards, reward),
      (self._discounts, discount),
      (self._q_taken, q),
    ):
      register[i, :-1] = register[i, 1:]
      register[i, -1] = value

  def _priorities(self, bootstrap: np.ndarray, rows=slice(None)) -> np.ndarray:
    """The priority of the item each environment (of `rows`) would create now."""
    if self.td_target is None:
      return np.full(len(self._rewards[rows]), DEFAULT_PRIORITY)
    targets = priorities.n_step_targets(
      self._rewards[rows], self._discounts[rows], bootstrap, self.td_target
    )
    return priorities.priority(targets - self._q_taken[rows, 0])

  # Shards.

  def _writer(self, shard: int) -> replay_io.RowWriter:
    return replay_io.RowWriter(self._clients[shard], self._layout)

  def _live_shard(self, i: int) -> int:
    """Environment i's home shard if it answers, else the next one that does."""
    shards = len(self._clients)
    return next(
      s % shards for s in range(self._home[i], self._home[i] + shards) if self._up[s % shards]
    )

  def _go_home(self, i: int) -> replay_io.RowWriter:
    """At an episode's start: back to the home shard if it answers again."""
    shard = self._live_shard(i)
    if shard != self._shard[i]:
      self._close_writer(self._writers[i])
      self._shard[i], self._writers[i] = shard, self._writer(shard)
    return self._writers[i]

  def _lose(self, shard: int, error: Exception) -> None:
    """Leaves a shard that stopped answering; its environments write to the others."""
    if not self._up[shard]:
      return
    self._up[shard] = False
    SHARDS_UP.set(self.shards_up)
    reason = rpc.first_line(error)
    if not self.shards_up:
      raise ReplayLost(f"replay shard {self._addresses[shard]} lost ({reason})", shard)
    log.warning(
      "lost replay shard %s (%s); writing to the %d other shard(s) until it answers again",
      self._addresses[shard],
      reason,
      self.shards_up,
    )
    for i, s in enumerate(self._shard):
      if s == shard:
        self._close_writer(self._writers[i])
        self._shard[i] = self._live_shard(i)
        self._writers[i] = self._writer(self._shard[i])
        self._restart[i] = True

  def lose_shard(self, shard: int, error: Exception) -> None:
    """A probe found `shard` not answering (collector.Collector)."""
    self._lose(shard, error)

  def shard_back(self, shard: int) -> None:
    """`shard` answers again: its environments go home at their next episode start."""
    if not self._up[shard]:
      self._up[shard] = True
      SHARDS_UP.set(self.shards_up)
      log.info(
        "replay shard %s answers again; writing to it from the next episodes",
        self._addresses[shard],
      )

  @staticmethod
  def _close_writer(writer: replay_io.RowWriter) -> None:
    try:
      writer.close()
    except Exception:  # its server is gone: what it held is lost with it
      pass

  def _wait(self, i: int, call) -> None:
    """Runs a blocking writer call, telling a rate-limited replay from a lost one.

    Waiting while the rate limiter holds inserts back is the back-pressure
    that keeps collectors from outrunning the trainer.
    """
    shard = self._shard[i]
    told = False
    while True:
      started = time.perf_counter()
      try:
        call()
        return
      except Exception as e:
        if not replay_io.is_timeout(e):
          raise
        # The deadline passed: find out why below.
      finally:
        REPLAY_WAIT.inc(time.perf_counter() - started)
      if self._stop.is_set():
        raise Stopped() from None
      try:
        size = self._clients[shard].server_info(timeout=ASK_TIMEOUT_S)[specs.TABLE].current_size
      except Exception as e:  # unreachable: leave it instead of waiting forever
        raise ReplayLost(
          f"replay shard {self._addresses[shard]} does not answer ({rpc.first_line(e)})",
          shard,
        ) from e
      if not told:  # once per wait
        told = True
        log.info(
          "replay %s (%d items) is holding inserts back: the trainer samples slower than "
          "the target ratio allows; waiting",
          self._addresses[shard],
          size,
        )

  def close(self, flush_timeout_s: float = 5.0) -> None:
    """Sends pending items (unless replay is gone or keeps them waiting), then closes.

    One deadline covers all writers: a rate limiter that holds one writer's
    items back holds every writer's, and E sequential timeouts would outlast
    the grace period a supervisor gives the process.
    """
    deadline = time.monotonic() + flush_timeout_s
    for i, writer in enumerate(self._writers):
      remaining_ms = int((deadline - time.monotonic()) * 1000)
      if remaining_ms <= 0:
        break
      if not self._up[self._shard[i]]:
        continue
      try:
        writer.flush(0, remaining_ms)
      except Exception as e:  # gone or rate limited: the items of unfinished steps are lost
        log.warning("could not send the last items to replay: %s", rpc.first_line(e))
        break
    for writer in self._writers:
      self._close_writer(writer)
