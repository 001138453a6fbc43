"""`dqnfleet up`: the whole fleet as local processes, with live progress.

Replay (one server per shard), trainer and N collectors run as separate OS
processes on loopback ports, exactly as they would on separate machines; `up`
only starts them, polls their status RPCs, restarts one that dies (as
Kubernetes or compose would: each recovers from its checkpoints and peers
reconnect), and stops them (collectors, trainer, replay) on Ctrl-C, when the
trainer reaches --max-train-steps, or when one died more often than MAX_RESTARTS.
The fleet ends with `up` however `up` ends: each child gets SIGTERM when `up`
dies, even by SIGKILL (Linux's parent-death signal), and stops as it would on
Ctrl-C, so no fleet trains on as orphans holding the run directory.
"""

import collections
import ctypes
import dataclasses
import functools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from dqnfleet.cli.commands import COMMANDS, Command, Configs
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import (
  INPUT_IN_PROCESS,
  EnvConfig,
  EvaluatorConfig,
  ReplayConfig,
  TrainerConfig,
  UpConfig,
)
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import Security

STOP_TIMEOUT_S = 30
# Restarts per service over a run: one that keeps dying is not recovering,
# and a fleet that goes on without it would hide that.
MAX_RESTARTS = 3
USAGE_ERROR = 2  # a service refused its settings: restarting cannot help
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # None: not Linux


def end_with(parent: int) -> None:
  """Run in a child of `up` before its program starts: SIGTERM when `up` (pid `parent`)
  ends. The signal follows the thread that started the child: `up` starts every child
  from its main thread, which lives as long as `up`."""
  if _prctl is None:
    return  # no parent-death signal here (macOS): children outlive a killed `up`
  _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != parent:  # `up` ended before the signal was armed
    os._exit(1)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FreePorts:
  """Free loopback ports, none given twice: the OS may offer again a port it
  just offered, since none of them is bound until its service starts."""

  def __init__(self):
    self._given: set[int] = set()

  def __call__(self) -> int:
    port = free_port()
    while port in self._given:
      port = free_port()
    self._given.add(port)
    return port


@dataclasses.dataclass(frozen=True)
class Launch:
  """One process of the fleet: the command it runs and all its settings."""

  name: str  # replay or replay-<i>, trainer, collector-<i>, evaluator: its log, status, progress
  command: Command
  configs: Configs  # the command's groups, with what `up` sets itself

  def argv(self) -> list[str]:
    """Every setting as a flag, so no variable or config file of `up`'s changes it."""
    return [flag for group in self.command.groups for flag in flags.to_flags(self.configs[group])]

  @property
  def status_port(self) -> int:
    return getattr(self.configs[self.command.service], self.command.status_port)

  @property
  def metrics_port(self) -> int:
    return self.configs[self.command.service].metrics_port


def launch(name: str, command: str, configs: Configs, **sets) -> Launch:
  """`command` with `up`'s configs of its groups, but for the settings `sets` gives it."""
  spec = COMMANDS[command]
  # Every address of the fleet is on this machine: nothing needs to listen wider.
  sets = {"listen_host": "127.0.0.1", **sets}
  # up has no flags for these (commands.py): setting others would override the user's.
  assert set(sets) == spec.up_sets, (command, sorted(set(sets) ^ spec.up_sets))
  own = []
  for group in spec.groups:
    mine = {f.name: sets[f.name] for f in dataclasses.fields(group) if f.name in sets}
    own.append(dataclasses.replace(configs[group], **mine))
  return Launch(name, spec, Configs(own))


def replay_names(shards: int) -> list[str]:
  """The replay processes' names: one shard keeps the name (and so the log and
  checkpoint directory) of the days before shards, so its run directories resume."""
  return ["replay"] if shards == 1 else [f"replay-{i}" for i in range(shards)]


def is_replay(name: str) -> bool:
  return name == "replay" or name.startswith("replay-")


def plan(configs: Configs) -> dict[str, Launch]:
  """The processes `up` starts, by name, in start order, on free loopback ports."""
  up = configs[UpConfig]
  run_dir = pathlib.Path(up.run_dir).resolve()
  ports = FreePorts()
  launches = {}
  for name in replay_names(up.replay_shards):
    launches[name] = launch(
      name,
      "replay",
      configs,
      port=ports(),
      status_port=ports(),
      metrics_port=ports(),
      # Named like its log: a shard restores its own table, never another's.
      checkpoint_dir=str(run_dir / f"{name}_checkpoints"),
    )
  replay_addresses = tuple(
    f"localhost:{one.configs[ReplayConfig].port}" for one in launches.values()
  )
  trainer = launch(
    "trainer",
    "trainer",
    configs,
    replay_addresses=replay_addresses,
    port=ports(),
    metrics_port=ports(),
    run_dir=str(run_dir),
    input_dispatcher_port=INPUT_IN_PROCESS,
  )
  trainer_address = f"localhost:{trainer.configs[TrainerConfig].port}"
  launches["trainer"] = trainer
  for i in range(up.collectors):
    name = f"collector-{i}"
    launches[name] = launch(
      name,
      "collector",
      configs,
      replay_addresses=replay_addresses,
      trainer_address=trainer_address,
      collector_id=name,
      seed=1000 * up.seed + i,
      status_port=ports(),
      metrics_port=ports(),
    )
  if up.evaluator:
    # Its TensorBoard summaries reach the run's logdir through the trainer.
    launches["evaluator"] = launch(
      "evaluator",
      "evaluator",
      configs,
      trainer_address=trainer_address,
      status_port=ports(),
      metrics_port=ports(),
      out_dir=str(run_dir / "eval"),
    )
  return launches


class Fleet:
  """The child processes, their addresses and logs."""

  def __init__(self, run_dir: pathlib.Path):
    self.logs = run_dir / "logs"
    self.logs.mkdir(parents=True, exist_ok=True)
    self.procs: dict[str, subprocess.Popen] = {}
    self.status_addresses: dict[str, str] = {}
    self.restarts: collections.Counter = collections.Counter()
    self._commands: dict[str, list[str]] = {}

  def start(self, launch: Launch) -> None:
    name = launch.name
    self._commands[name] = [sys.executable, "-m", "dqnfleet", launch.command.name, *launch.argv()]
    self.status_addresses[name] = f"localhost:{launch.status_port}"
    self._spawn(name)

  def restart(self, name: str) -> None:
    self.restarts[name] += 1
    self._spawn(name)

  def _spawn(self, name: str) -> None:
    log = open(self.logs / f"{name}.log", "ab")
    # A session of its own: Ctrl-C reaches `up` alone, which then stops the
    # children in order instead of all at once.
    self.procs[name] = subprocess.Popen(
      self._commands[name],
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
      preexec_fn=functools.partial(end_with, os.getpid()),
    )
    log.close()  # the child has its own copy

  def dead(self) -> list[str]:
    return [n for n, p in self.procs.items() if p.poll() is not None]

  def stop(self, names: list[str]) -> None:
    for name in names:
      proc = self.procs[name]
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for name in names:
      proc = self.procs[name]
      try:
        proc.wait(STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {STOP_TIMEOUT_S}s; killing it", flush=True)
        proc.kill()
        proc.wait()

  def tail(self, name: str, lines: int = 15) -> str:
    text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class Progress:
  """One line per poll: rates from counter deltas between polls."""

  def __init__(self):
    self._last = None

  def line(self, statuses: dict, elapsed: float) -> str:
    trainer = statuses.get("trainer")
    collectors = [s for n, s in statuses.items() if n.startswith("collector") and s]
    env_steps = sum(c.counters.env_steps for c in collectors)
    train_steps = trainer.counters.train_steps if trainer else 0
    now = time.monotonic()
    env_rate = train_rate = 0.0
    if self._last:
      t0, e0, s0 = self._last
      env_rate, train_rate = (env_steps - e0) / (now - t0), (train_steps - s0) / (now - t0)
    self._last = (now, env_steps, train_steps)
    returns = [r for c in collectors for r in c.recent_returns]
    acting = ",".join(f"v{c.policy_version}" for c in collectors) or "-"
    evaluator = statuses.get("evaluator")
    evaluation = ""
    if evaluator and evaluator.policy_version >= 0:
      evaluation = f" | eval v{evaluator.policy_version}: {evaluator.counters.last_mean_return:.1f}"
    return (
      f"[{elapsed:6.0f}s] env steps {env_steps:,.0f} ({env_rate:,.0f}/s) | "
      f"train steps {train_steps:,.0f} ({train_rate:,.1f}/s) | "
      f"replay {replay_summary(statuses)} | "
      f"policy published v{trainer.policy_version if trainer else '-'} acting {acting} | "
      f"return {np.mean(returns) if returns else float('nan'):.1f} "
      f"(last {len(returns)} episodes){evaluation}"
    )


def replay_summary(statuses: dict) -> str:
  """Items in replay over every shard that answers, and which shards do not."""
  shards = {name: status for name, status in statuses.items() if is_replay(name)}
  answering = [status for status in shards.values() if status]
  size = f"{sum(s.replay_size for s in answering):,}" if answering else "-"
  if len(shards) == 1:
    return size
  down = [name for name, status in shards.items() if not status]
  return f"{size} in {len(shards)} shards" + (f", down: {', '.join(down)}" if down else "")


def restart_dead(fleet: Fleet, dead: list[str]) -> bool:
  """Restarts each dead service; False if one must not be (stop the fleet then)."""
  for name in dead:
    code = fleet.procs[name].returncode
    print(f"{name} exited with code {code}; last log lines:\n{fleet.tail(name)}", flush=True)
    if code == USAGE_ERROR:
      print(f"{name} refused its settings; stopping the fleet", flush=True)
      return False
    if fleet.restarts[name] >= MAX_RESTARTS:
      print(f"{name} died {MAX_RESTARTS + 1} times; stopping the fleet", flush=True)
      return False
    print(
      f"restarting {name} (restart {fleet.restarts[name] + 1} of at most {MAX_RESTARTS})",
      flush=True,
    )
    fleet.restart(name)
  return True


def run(configs: Configs, *, security: Security) -> int:
  up = configs[UpConfig]
  run_dir = pathlib.Path(up.run_dir).resolve()
  fleet = Fleet(run_dir)
  launches = plan(configs)
  for one in launches.values():
    fleet.start(one)
  shards = ", ".join(
    f"{name} :{one.configs[ReplayConfig].port} (status :{one.status_port})"
    for name, one in launches.items()
    if is_replay(name)
  )
  print(
    f"dqnfleet up: {configs[EnvConfig].env_id}, {shards}, trainer "
    f":{launches['trainer'].status_port}, {up.collectors} collectors; run dir {run_dir}",
    flush=True,
  )
  if "evaluator" in launches:
    print(
      f"evaluations of the newest policy every "
      f"{launches['evaluator'].configs[EvaluatorConfig].every_minutes:g} min in "
      f"{run_dir / 'eval'} (history.csv, best_episode.gif)",
      flush=True,
    )
  print(
    "Prometheus metrics: "
    + ", ".join(
      f"{name} http://localhost:{one.metrics_port}/metrics" for name, one in launches.items()
    ),
    flush=True,
  )
  print(
    f"logs in {fleet.logs}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}; "
    "Ctrl-C stops the fleet",
    flush=True,
  )

  interrupted = []
  signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
  signal.signal(signal.SIGTERM, lambda *_: interrupted.append(True))
  progress, started, code = Progress(), time.monotonic(), 0
  try:
    while not interrupted:
      dead = fleet.dead()
      if "trainer" in dead and fleet.procs["trainer"].returncode == 0:
        print("trainer reached its last train step; stopping the fleet", flush=True)
        break
      if dead and not restart_dead(fleet, dead):
        code = 1
        break
      statuses = {}
      for name, address in fleet.status_addresses.items():
        try:
          statuses[name] = rpc.get_status(address, timeout=2, security=security)
        except Exception:  # still starting (TensorFlow import takes seconds)
          statuses[name] = None
      if any(statuses.values()):
        print(progress.line(statuses, time.monotonic() - started), flush=True)
      else:
        print(f"[{time.monotonic() - started:6.0f}s] starting services...", flush=True)
      deadline = time.monotonic() + up.progress_every_s
      while time.monotonic() < deadline and not interrupted and not fleet.dead():
        time.sleep(0.2)
  finally:
    print("stopping collectors, trainer, replay...", flush=True)
    collectors = [n for n in fleet.procs if n.startswith(("collector", "evaluator"))]
    fleet.stop(collectors)
    fleet.stop(["trainer"])
    fleet.stop([n for n in fleet.procs if is_replay(n)])
    print(f"stopped; policies in {run_dir / 'policies'}", flush=True)
  return code
