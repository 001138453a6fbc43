"""What each service reports over StatusService.GetStatus, as typed records.

A service fills its role's counters dataclass; every reader (`dqnfleet up`'s
progress line, the evaluator reading the trainer, `dqnfleet status`, the
tests) decodes the reply into the same dataclass. A counter is a field that
both sides name in code, so renaming one renames it for its readers, and a
reader that names a counter no role has fails at once instead of reading a
default. On the wire the counters stay the proto's `map<string, double>`
(protos/dqnfleet/v1/fleet.proto), so `dqnfleet status --json` and older
readers see the same keys as before.
"""

import dataclasses
import math
import time
import typing
from collections.abc import Callable

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc

NAN = math.nan


@dataclasses.dataclass
class ReplayCounters:
  replay_size: int = -1  # items in the table now
  max_size: int = -1  # the table's capacity
  min_size_to_sample: int = -1  # items needed before the trainer may sample
  items_inserted: int = -1  # since the table was created (restored with a checkpoint)
  items_sampled: int = -1  # since the table was created
  episodes: int = -1  # episodes whose items are in the table
  persist_failing: int = 0  # 1 while its checkpoints fail for lack of disk space


@dataclasses.dataclass
class CollectorCounters:
  env_steps: int = 0  # agent steps this process collected
  episodes: int = 0  # episodes it finished
  policy_updates: int = 0  # published versions it switched to
  epsilon: float = NAN  # exploration rate acting now
  seed: int = -1  # seed of its environments and exploration
  fleet_env_steps: int = 0  # agent steps of the whole fleet (replay's insert count)
  source_id: int = 0  # what marks its items in replay (rl.specs.source_id)


@dataclasses.dataclass
class TrainerCounters:
  train_steps: int = 0  # the train step (the version it publishes next)
  loss: float = NAN  # TD loss of a recent train step
  train_steps_per_s: float = 0.0
  published_version: int = -1  # newest version announced to followers
  policy_lag_steps: float = 0.0  # train steps between now and the policy that collected a batch
  mean_q: float = NAN  # mean greedy Q-value of a recent batch
  fleet_env_steps: int = 0  # agent steps of the whole fleet (replay's insert count)
  bad_items_dropped: int = 0  # replay items with impossible values or shapes, deleted
  unreadable_items_skipped: int = 0  # replay items of another dtype, skipped
  replay_shards: int = 0  # replay servers it was given (0: an older trainer)
  replay_shards_up: int = 0  # of them, those it samples from now (they answer, their table fits)
  input_workers: int = -1  # input workers registered with its dispatcher (-1: samples itself)
  persist_failing: int = 0  # kinds of write failing for lack of disk space (0: all written)


@dataclasses.dataclass
class EvaluatorCounters:
  evaluations: int = 0  # evaluations finished
  versions_seen: int = 0  # published versions it heard of
  persist_failing: int = 0  # kinds of write (history, GIF) failing for lack of disk space
  # The newest evaluation's results; -1 / NaN before the first one.
  last_version: int = -1
  last_mean_return: float = NAN
  last_median_return: float = NAN
  last_max_return: float = NAN
  last_mean_length: float = NAN
  last_frames: int = -1  # emulator frames the fleet had collected then
  last_minutes: float = NAN  # the trainer's uptime then


@dataclasses.dataclass
class InputWorkerCounters:
  registered: int = 0  # 1 once the trainer's dispatcher has taken it, else 0
  pipelines: int = 0  # the trainer's input pipelines (one per replay shard) it runs now


COUNTERS = {
  "replay": ReplayCounters,
  "collector": CollectorCounters,
  "trainer": TrainerCounters,
  "evaluator": EvaluatorCounters,
  "input-worker": InputWorkerCounters,
}
Counters = (
  ReplayCounters | CollectorCounters | TrainerCounters | EvaluatorCounters | InputWorkerCounters
)


@dataclasses.dataclass
class Report:
  """What a service's snapshot function returns at each GetStatus."""

  counters: Counters
  policy_version: int = -1  # published (trainer), acting (collector), evaluated; -1: none
  replay_size: int = -1  # items in the replay table; -1 where unknown
  recent_returns: list[float] = dataclasses.field(default_factory=list)
  env_id: str | None = None  # None: the one the service was started with


@dataclasses.dataclass
class Status:
  """A decoded GetStatus reply."""

  role: str
  id: str
  env_id: str
  counters: Counters
  policy_version: int
  replay_size: int
  recent_returns: list[float]
  uptime_s: float


# Each role's counter names and types, read once: decode runs at every poll.
_FIELD_TYPES = {role: typing.get_type_hints(cls) for role, cls in COUNTERS.items()}


def _number(kind, value: float):
  return int(value) if kind is int and math.isfinite(value) else value


def decode(reply: fleet_pb2.ServiceStatus) -> Status:
  """A reply as its role's typed record; counters the reply lacks keep their defaults."""
  if reply.role not in COUNTERS:
    raise ValueError(f"status of an unknown role {reply.role!r}; known: {', '.join(COUNTERS)}")
  cls = COUNTERS[reply.role]
  counters = cls(
    **{
      name: _number(kind, reply.counters[name])
      for name, kind in _FIELD_TYPES[reply.role].items()
      if name in reply.counters
    }
  )
  return Status(
    role=reply.role,
    id=reply.id,
    env_id=reply.env_id,
    counters=counters,
    policy_version=reply.policy_version,
    replay_size=reply.replay_size,
    recent_returns=list(reply.recent_returns),
    uptime_s=reply.uptime_s,
  )


class StatusServicer(fleet_pb2_grpc.StatusServiceServicer):
  """Answers GetStatus from the Report a service's `snapshot` returns."""

  def __init__(self, role: str, service_id: str, env_id: str, snapshot: Callable[[], Report]):
    if role not in COUNTERS:
      raise ValueError(f"no status record for role {role!r}; known: {', '.join(COUNTERS)}")
    self._role, self._id, self._env_id = role, service_id, env_id
    self._snapshot = snapshot
    self._started = time.monotonic()

  def GetStatus(self, request, context):
    report = self._snapshot()
    if not isinstance(report.counters, COUNTERS[self._role]):
      raise TypeError(
        f"a {self._role} reports {COUNTERS[self._role].__name__}, "
        f"not {type(report.counters).__name__}"
      )
    return fleet_pb2.ServiceStatus(
      role=self._role,
      id=self._id,
      env_id=self._env_id if report.env_id is None else report.env_id,
      counters={k: float(v) for k, v in dataclasses.asdict(report.counters).items()},
      policy_version=int(report.policy_version),
      replay_size=int(report.replay_size),
      recent_returns=list(report.recent_returns),
      uptime_s=time.monotonic() - self._started,
    )
