"""The observer: writes each environment's transitions into the replay table.

One Reverb trajectory writer per environment (core/rl/replay_io.py's
RowWriter), rows and items laid out as core/rl/specs.py describes (each frame
stored once). It is a TF-Agents *transition* observer: the driver hands it
(s_t, a_t, s_t+1) for all environments at once.
"""

import logging
import time

import numpy as np
import reverb
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.transport import metrics

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
WAIT_TIMEOUT_MS = 10_000

REPLAY_WAIT = metrics.counter(
  "collector_replay_wait_seconds",
  "Seconds spent waiting for replay to take items (rate limiter or a slow server).",
)


class ReplayLost(RuntimeError):
  """The replay server stopped answering; the collector reconnects (replay_io.is_lost_server)."""


class Stopped(Exception):
  """The collector was asked to stop while waiting for the replay server."""


class ReplayObserver:
  """Turns batched transitions into replay items, one writer per environment."""

  def __init__(
    self,
    client: reverb.Client,
    env_specs: specs.EnvSpecs,
    num_envs: int,
    policy_version,
    stop,
    source: int,
  ):
    self._client, self._stop = client, stop
    self._source = source
    self._specs = env_specs
    self._policy_version = policy_version  # callable: version acting right now
    layout = replay_io.ItemLayout.of(env_specs)
    self._writers = [replay_io.RowWriter(client, layout) for _ in range(num_envs)]
    # Transitions of each environment's episode so far: an n-step item needs n.
    self._episode_steps = [0] * num_envs
    self._calls = 0
    self.items_written = 0
    self.steps_observed = 0

  def __call__(self, transition) -> None:
    time_step, action_step, next_time_step = transition
    version = self._policy_version()
    # What every environment appends, packed once for all of them.
    frames = self._specs.newest_frames(next_time_step.observation)
    steps = specs.pack_steps(
      np.asarray(action_step.action),
      next_time_step.reward,
      next_time_step.discount,
      version,
      self._source,
    )
    step_types = time_step.step_type.tolist()
    ends = (next_time_step.step_type == ts.StepType.LAST).tolist()
    n = self._specs.n_step
    self._calls += 1
    for i, writer in enumerate(self._writers):
      if step_types[i] == ts.StepType.LAST:
        continue  # the LAST -> FIRST step of an autoreset carries no transition
      if step_types[i] == ts.StepType.FIRST:
        self._episode_steps[i] = 0
        for frame in self._specs.frames_of(time_step.observation[i]):
          writer.append(**specs.row(frame, 0, 0, 1, -1, self._source))
      writer.append(frames[i], steps[i])
      self._episode_steps[i] += 1
      self.steps_observed += 1
      if self._episode_steps[i] >= n:
        writer.create_item()
        self.items_written += 1
      if ends[i]:
        # The episode's last n-1 transitions still wait for their items.
        padding = specs.padding_row(frames[i], version, self._source)
        for _ in range(min(n - 1, self._episode_steps[i])):
          writer.append(**padding)
          writer.create_item()
          self.items_written += 1
        self._wait(lambda: writer.end_episode(timeout_ms=WAIT_TIMEOUT_MS))
      elif (self._calls + i) % BACKPRESSURE_EVERY == 0:  # writers take turns
        self._wait(lambda: writer.flush(MAX_IN_FLIGHT_ITEMS, WAIT_TIMEOUT_MS))

  def _wait(self, call) -> None:
    """Runs a blocking writer call, telling a rate-limited replay from a lost one.

    Waiting while the rate limiter holds inserts back is the back-pressure
    that keeps collectors from outrunning the trainer.
    """
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
        size = self._client.server_info(timeout=5)[specs.TABLE].current_size
      except Exception as e:  # unreachable: reconnect instead of waiting forever
        raise ReplayLost(f"replay server does not answer ({str(e).splitlines()[0][:120]})") from e
      log.info(
        "replay (%d items) is holding inserts back: the trainer samples slower than "
        "the target ratio allows; waiting",
        size,
      )

  def close(self, flush_timeout_s: float = 5.0) -> None:
    """Sends pending items (unless replay is gone or keeps them waiting), then closes.

    One deadline covers all writers: a rate limiter that holds one writer's
    items back holds every writer's, and E sequential timeouts would outlast
    the grace period a supervisor gives the process.
    """
    deadline = time.monotonic() + flush_timeout_s
    for writer in self._writers:
      remaining_ms = int((deadline - time.monotonic()) * 1000)
      if remaining_ms <= 0:
        break
      try:
        writer.flush(0, remaining_ms)
      except Exception as e:  # gone or rate limited: the items of unfinished steps are lost
        log.warning("could not send the last items to replay: %s", str(e).splitlines()[0][:200])
        break
    for writer in self._writers:
      try:
        writer.close()
      except Exception:  # the server may already be gone at shutdown
        pass
