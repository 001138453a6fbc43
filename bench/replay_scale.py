"""What one replay server carries: inserts/s and CPU per transition with 1, 2, 4 ... writers.

Starts the real `dqnfleet replay` service (the production table, Breakout
signature) as its own process, then for each N runs N writer processes at
once for a fixed time. Each writer is one Breakout collector's write path:
the collector's `ReplayObserver` (8 `RowWriter`s, back-pressure, episode
ends) fed with real Breakout transitions recorded once from the native ALE
environments under a random policy and replayed in a loop, so frames
compress as real ones do (random noise frames would not compress at all and
would measure the network, not replay). Last, one sampler process reads the
full table through the trainer's own tf.data pipeline (batch 32).

Reported per phase: transitions/s the server completed (its own insert or
sample counter), the server's CPU seconds per 1,000 of them (utime + stime
from /proc/<pid>/stat), the writers' or sampler's CPU per 1,000, and the
machine's busy cores and load average: on a small shared machine the server
competes with its writers for cores, so per-transition CPU is what
transfers to another machine, not transitions/s.

Rate limiter: samples_per_insert 1000, tolerance 100 and min size 50,000
give an error buffer of 5e9, so inserts are held back only after 5.05 M
inserts (plus one per 1,000 samples) and samples essentially never; the
table is limited to 100,000 items (--max-size) so it is full after the first
phase and every insert also evicts the oldest item, as in a long run.

    .venv/bin/python bench/replay_scale.py [--writers 1,2,4,8] [--seconds 20]

Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import numpy as np
import reverb
from tf_agents.trajectories import policy_step
from tf_agents.trajectories import time_step as ts

from dqnfleet.cli.up import free_port
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import envs, specs
from dqnfleet.core.rl.priorities import TdTarget
from dqnfleet.core.settings.config import AgentConfig, EnvConfig
from dqnfleet.core.transport import rpc

ENV = EnvConfig(env_id="ALE/Breakout-v5")
NUM_ENVS = 8  # a collector's default
SAMPLER_BATCH = 32  # the trainer's default
GAMMA = AgentConfig().gamma  # the trainer's default
TICKS = os.sysconf("SC_CLK_TCK")
# Inserts are never held back and samples never wait (see the docstring).
MIN_SIZE = 50_000
LIMITER_FLAGS = [
  "--samples-per-insert=1000",
  "--rate-limit-tolerance=100",
  f"--min-size={MIN_SIZE}",
]


def record_transitions(path: str, batched_steps: int, seed: int = 1) -> None:
  """Steps the real Breakout environments under a random policy; keeps what the observer reads."""
  env = envs.BatchedEnvironment(ENV, NUM_ENVS, seed=seed)
  rng = np.random.default_rng(seed)
  frame = specs.env_specs(ENV).frame
  frames = np.lib.format.open_memmap(
    os.path.join(path, "frames.npy"), "w+", frame.dtype, (batched_steps + 1, NUM_ENVS) + frame.shape
  )
  step_types = np.zeros((batched_steps + 1, NUM_ENVS), np.int32)
  rewards = np.zeros((batched_steps + 1, NUM_ENVS), np.float32)
  discounts = np.zeros((batched_steps + 1, NUM_ENVS), np.float32)
  actions = rng.integers(0, specs.env_specs(ENV).num_actions, (batched_steps, NUM_ENVS))
  time_step = env.reset()
  for t in range(batched_steps + 1):
    frames[t] = time_step.observation[:, -1]
    step_types[t], rewards[t], discounts[t] = (
      time_step.step_type,
      time_step.reward,
      time_step.discount,
    )
    if t < batched_steps:
      time_step = env.step(actions[t])
  env.close()
  frames.flush()
  np.savez(
    os.path.join(path, "steps.npz"),
    step_types=step_types,
    rewards=rewards,
    discounts=discounts,
    actions=actions,
  )


class RecordedTransitions:
  """The recorded transitions again and again, as the driver hands them to the observer."""

  def __init__(self, path: str):
    self._frames = np.load(os.path.join(path, "frames.npy"), mmap_mode="r")
    steps = np.load(os.path.join(path, "steps.npz"))
    self._types, self._rewards = steps["step_types"], steps["rewards"]
    self._discounts, self._actions = steps["discounts"], steps["actions"]
    self._t = 0
    self._obs = self._stack(None, 0)
    # What the collect policy adds to its actions: the Q-values and epsilons
    # acted with (their values do not change what is written, only priorities).
    num_actions = specs.env_specs(ENV).num_actions
    self.q_values = np.zeros((NUM_ENVS, num_actions))
    self._info = {"q_values": self.q_values, "epsilon": np.zeros(NUM_ENVS, np.float32)}

  def _stack(self, previous, t):
    frame = np.asarray(self._frames[t])[..., None]
    if previous is None:
      return np.repeat(frame, ENV.frame_stack, axis=-1)
    obs = np.concatenate([previous[..., 1:], frame], axis=-1)
    first = self._types[t] == ts.StepType.FIRST
    obs[first] = frame[first]  # a new episode's stack starts from its first frame
    return obs

  def _time_step(self, t, obs):
    return ts.TimeStep(self._types[t], self._rewards[t], self._discounts[t], obs)

  def next(self):
    t = self._t
    if t + 1 == len(self._types):  # start over at the recorded reset (all FIRST)
      t, self._obs = 0, self._stack(None, 0)
    next_obs = self._stack(self._obs, t + 1)
    transition = (
      self._time_step(t, self._obs),
      policy_step.PolicyStep(self._actions[t], (), self._info),
      self._time_step(t + 1, next_obs),
    )
    self._t, self._obs = t + 1, next_obs
    return transition


def run_writer(address: str, recorded: str, index: int, warmup_s: float, seconds: float) -> dict:
  """One collector's write path at full speed: a ReplayObserver over recorded transitions."""
  client = reverb.Client(address)
  source = RecordedTransitions(recorded)
  observer = ReplayObserver(
    [client],
    specs.env_specs(ENV),
    NUM_ENVS,
    lambda: 0,
    threading.Event(),
    specs.source_id(f"bench-{index}"),
  )
  observer.td_target = TdTarget(gamma=0.99, reward_scale=1.0)  # priorities as in a fleet
  print("ready", flush=True)
  sys.stdin.readline()  # go
  measure_at = time.monotonic() + warmup_s
  end = measure_at + seconds
  cpu0 = items0 = None
  while (now := time.monotonic()) < end:
    if cpu0 is None and now >= measure_at:
      cpu0, items0 = time.process_time(), observer.items_written
    observer(source.next(), source.q_values)
  cpu, items = time.process_time() - cpu0, observer.items_written - items0
  observer.close()
  return {"items_written": items, "cpu_s": cpu}


def run_sampler(address: str, warmup_s: float, seconds: float) -> dict:
  """The trainer's dataset at full speed, nothing trained."""
  from dqnfleet.trainer.dataset import make_dataset

  dataset = iter(make_dataset(address, specs.env_specs(ENV), SAMPLER_BATCH, 4, GAMMA))
  next(dataset)
  print("ready", flush=True)
  sys.stdin.readline()
  measure_at = time.monotonic() + warmup_s
  end = measure_at + seconds
  cpu0 = batches = None
  while (now := time.monotonic()) < end:
    if cpu0 is None and now >= measure_at:
      cpu0, batches = time.process_time(), 0
    next(dataset)
    if batches is not None:
      batches += 1
  return {"items_sampled": batches * SAMPLER_BATCH, "cpu_s": time.process_time() - cpu0}


def process_cpu_s(pid: int) -> float:
  """utime + stime of a process (all its threads), in seconds."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float:
  """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
  with open("/proc/stat") as f:
    values = [int(v) for v in f.readline().split()[1:]]
  return (sum(values[:8]) - values[3] - values[4]) / TICKS


def start_server(extra_flags: list[str]) -> tuple[subprocess.Popen, str]:
  port = free_port()
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dqnfleet",
      "replay",
      f"--env-id={ENV.env_id}",
      f"--port={port}",
      f"--status-port={free_port()}",
      "--metrics-port=-1",
      *extra_flags,
    ],
    stderr=subprocess.DEVNULL,
  )
  client = reverb.Client(f"localhost:{port}")
  rpc.retry(lambda: client.server_info(timeout=5), "connecting to the benchmark's replay")
  return server, f"localhost:{port}"


def spawn(role: str, *args) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, __file__, f"--role={role}", *map(str, args)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )


def phase(
  server: subprocess.Popen,
  client: reverb.Client,
  children: list[subprocess.Popen],
  warmup_s: float,
  seconds: float,
  counter: str,
) -> dict:
  """Starts the ready children together; the server's counter and CPU over the measured window."""
  for child in children:
    if child.stdout.readline().strip() != "ready":
      raise RuntimeError("a benchmark process failed to start")
  for child in children:
    child.stdin.write("go\n")
    child.stdin.flush()
  time.sleep(warmup_s)
  stats = lambda: getattr(client.server_info()[specs.TABLE].rate_limiter_info, counter).completed
  count0, cpu0, busy0 = stats(), process_cpu_s(server.pid), machine_busy_s()
  wall0 = time.monotonic()
  time.sleep(seconds)
  count, cpu, busy = stats() - count0, process_cpu_s(server.pid) - cpu0, machine_busy_s() - busy0
  wall = time.monotonic() - wall0
  reports = []
  for child in children:
    out, _ = child.communicate(timeout=120)
    reports.append(json.loads(out.strip().splitlines()[-1]))
  client_cpu = sum(r["cpu_s"] for r in reports)
  return {
    "transitions_per_s": round(count / wall, 1),
    "server_cpu_s_per_1000": round(1000 * cpu / max(count, 1), 4),
    "server_cores_busy": round(cpu / wall, 3),
    "client_cpu_s_per_1000": round(1000 * client_cpu / max(count, 1), 4),
    "machine_cores_busy": round(busy / wall, 2),
    "load_average_1m": round(os.getloadavg()[0], 2),
    "transitions": count,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--writers", default="1,2,4,8", help="writer counts to measure, in order")
  parser.add_argument("--seconds", type=float, default=20.0, help="measured time per phase")
  parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured time before each")
  parser.add_argument("--max-size", type=int, default=100_000)
  parser.add_argument(
    "--record-steps",
    type=int,
    default=2000,
    help="batched steps of 8 environments recorded and replayed by writers",
  )
  parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
  parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.role == "writer":
    address, recorded, index, warmup, seconds = args.args
    print(json.dumps(run_writer(address, recorded, int(index), float(warmup), float(seconds))))
    return
  if args.role == "sampler":
    address, warmup, seconds = args.args
    print(json.dumps(run_sampler(address, float(warmup), float(seconds))))
    return

  counts = [int(n) for n in args.writers.split(",")]
  with tempfile.TemporaryDirectory(prefix="replay_scale_") as recorded:
    record_transitions(recorded, args.record_steps)
    server, address = start_server(LIMITER_FLAGS + [f"--max-size={args.max_size}"])
    client = reverb.Client(address)
    results = {}
    try:
      for n in counts:
        writers = [
          spawn("writer", address, recorded, i, args.warmup, args.seconds) for i in range(n)
        ]
        results[f"writers_{n}"] = phase(
          server, client, writers, args.warmup, args.seconds, "insert_stats"
        )
      if client.server_info()[specs.TABLE].current_size >= MIN_SIZE:
        sampler = [spawn("sampler", address, args.warmup, args.seconds)]
        results["sampler_1"] = phase(
          server, client, sampler, args.warmup, args.seconds, "sample_stats"
        )
      else:  # too short a run to fill the table: the sampler would wait forever
        results["sampler_1"] = f"skipped: fewer than {MIN_SIZE} items in the table"
      table = client.server_info()[specs.TABLE]
    finally:
      server.terminate()
      server.wait()
  print(
    json.dumps(
      {
        "benchmark": "replay_scale",
        "env_id": ENV.env_id,
        "envs_per_writer": NUM_ENVS,
        "frames": f"real Breakout frames (random policy), {args.record_steps} batched steps "
        "recorded once and replayed",
        "seconds_per_phase": args.seconds,
        "max_size": args.max_size,
        "rate_limiter": " ".join(LIMITER_FLAGS),
        "cores": os.cpu_count(),
        "phases": results,
        "table_size_at_end": table.current_size,
      }
    )
  )


if __name__ == "__main__":
  main()
