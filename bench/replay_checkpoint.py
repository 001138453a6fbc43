"""The cost of checkpointing a full Breakout replay table, and of restoring it.

Starts the real `dqnfleet replay` service (the production table and Reverb
checkpointer, into a fresh directory), fills it with --items real Breakout
transitions through the collector's observer (bench/replay_scale.py's
writers: recorded frames, 8 environments per writer), then runs one
inserter and one sampler at a steady rate (by default about what the fleet
of `make run` does on 2 cores: 250 transitions/s in, 2,000 sampled out,
the trainer's tf.data pipeline) and asks the server for a checkpoint while
they run. Reported:

  - the checkpoint's duration and its size on disk;
  - stalls: the longest gap between successive completed observer calls
    (inserts, as a collector feels them) and sampled batches (as the
    trainer feels them) during the checkpoint, and their rates before and
    during it; the server's own insert/sample counters polled every 20 ms
    from a third process give the same from replay's side;
  - the server's resident memory before and at most during the checkpoint;
  - the restore: the server is killed with SIGKILL (a crash: the
    checkpoint just written is what survives) and started again on the same
    directory; the time until it answers and serves a sample, against the
    time an empty server took to start.

The checkpoint files are deleted at the end. The rate limiter never blocks
(bench/replay_scale.py's settings), so stalls are the checkpoint's alone.

    .venv/bin/python bench/replay_checkpoint.py [--items 1000000] [--dir /tmp]

--items 20000 is a quick try. Prints one JSON object.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import replay_scale  # bench/, next to this file
import reverb
from replay_scale import ENV, LIMITER_FLAGS

from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import specs
from dqnfleet.core.rl.priorities import TdTarget

POLL_S = 0.02
# A full 1-step-per-row Breakout table (docs/performance.md: 1,413 bytes per
# transition in memory); the checkpoint should not need more on disk.
DISK_BYTES_PER_ITEM = 3_000


def paced(rate_per_s: float, stop: threading.Event):
  """Yields at `rate_per_s` until stopped, without catching up after a stall."""
  interval, next_at = 1.0 / rate_per_s, time.monotonic()
  while not stop.is_set():
    now = time.monotonic()
    if now < next_at:
      time.sleep(next_at - now)
    yield
    next_at = max(next_at + interval, time.monotonic())


def stop_on_stdin() -> threading.Event:
  stop = threading.Event()
  threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
  return stop


def run_inserter(address: str, recorded: str, rate: float, out: str) -> None:
  """One collector's observer at `rate` transitions/s; the time each observer call returned."""
  client = reverb.Client(address)
  source = replay_scale.RecordedTransitions(recorded)
  observer = ReplayObserver(
    [client],
    specs.env_specs(ENV),
    replay_scale.NUM_ENVS,
    lambda: 0,
    threading.Event(),
    specs.source_id("bench-inserter"),
  )
  observer.td_target = TdTarget(gamma=0.99, reward_scale=1.0)  # priorities as in a fleet
  print("ready", flush=True)
  done = []
  for _ in paced(rate / replay_scale.NUM_ENVS, stop_on_stdin()):
    observer(source.next(), source.q_values)
    done.append(time.monotonic())
  np.save(out, np.array(done))
  observer.close()


def run_sampler(address: str, rate: float, out: str) -> None:
  """The trainer's dataset at `rate` items/s; the time each batch arrived."""
  from dqnfleet.trainer.dataset import make_dataset

  dataset = iter(
    make_dataset(address, specs.env_specs(ENV), replay_scale.SAMPLER_BATCH, 4, replay_scale.GAMMA)
  )
  next(dataset)
  print("ready", flush=True)
  done = []
  for _ in paced(rate / replay_scale.SAMPLER_BATCH, stop_on_stdin()):
    next(dataset)
    done.append(time.monotonic())
  np.save(out, np.array(done))


def rss_bytes(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


class Poller:
  """The server's counters and memory every POLL_S, as (time answered, inserts, samples, rss)."""

  def __init__(self, client: reverb.Client, pid: int):
    self.rows, self._stop = [], threading.Event()
    self._client, self._pid = client, pid
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(POLL_S):
      limiter = self._client.server_info(timeout=60)[specs.TABLE].rate_limiter_info
      self.rows.append(
        (
          time.monotonic(),
          limiter.insert_stats.completed,
          limiter.sample_stats.completed,
          rss_bytes(self._pid),
        )
      )

  def stop(self):
    self._stop.set()
    self._thread.join()
    return np.array(self.rows)


def stalls(times: np.ndarray, start: float, end: float, before_s: float, per_event: int) -> dict:
  """Gaps between events that overlap [start, end], and rates before and during."""
  times = np.sort(times)
  gaps = np.diff(times)
  overlapping = (times[1:] >= start) & (times[:-1] <= end)
  before = ((times >= start - before_s) & (times < start)).sum()
  during = ((times >= start) & (times <= end)).sum()
  longest = float(gaps[overlapping].max()) if overlapping.any() else end - start
  return {
    "max_gap_during_s": round(longest, 3),
    # Gaps of a quarter second or more: time the writer or sampler stood still.
    "gaps_over_0.25s_during_s": round(float(gaps[overlapping & (gaps >= 0.25)].sum()), 3),
    "max_gap_before_s": round(
      float(gaps[(times[1:] < start) & (times[1:] >= start - before_s)].max()), 3
    ),
    "per_s_before": round(before * per_event / before_s, 1),
    "per_s_during": round(during * per_event / max(end - start, 1e-9), 1),
  }


def counter_stalls(rows: np.ndarray, column: int, start: float, end: float) -> float:
  """Longest time during [start, end] that the server's counter did not advance."""
  times, counts = rows[:, 0], rows[:, column]
  advanced = times[1:][np.diff(counts) > 0]
  marks = np.concatenate([[start], advanced[(advanced > start) & (advanced < end)], [end]])
  return round(float(np.diff(marks).max()), 3)


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def start_server(checkpoint_dir: str, items: int) -> tuple[subprocess.Popen, str, float]:
  started = time.monotonic()
  min_size = min(50_000, items // 2)  # inserts are held back after 101 x min size
  limiter = [f for f in LIMITER_FLAGS if not f.startswith("--min-size")]
  limiter.append(f"--min-size={min_size}")
  # --checkpoint-every-s 0: the server checkpoints only when asked (and at
  # SIGTERM, which this benchmark does not send).
  server, address = replay_scale.start_server(
    limiter
    + [f"--max-size={items}", f"--checkpoint-dir={checkpoint_dir}", "--checkpoint-every-s=0"]
  )
  return server, address, time.monotonic() - started


def spawn(role: str, *args) -> subprocess.Popen:
  child = subprocess.Popen(
    [sys.executable, __file__, f"--role={role}", *map(str, args)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  if child.stdout.readline().strip() != "ready":
    raise RuntimeError(f"the benchmark's {role} failed to start")
  return child


def fill(address: str, recorded: str, items: int, writers: int) -> dict:
  """Fills the table with `items` transitions as fast as `writers` collectors write."""
  client = reverb.Client(address)
  children = [replay_scale.spawn("writer", address, recorded, i, 0, 10**6) for i in range(writers)]
  for child in children:
    assert child.stdout.readline().strip() == "ready"
  started = time.monotonic()
  for child in children:
    child.stdin.write("go\n")
    child.stdin.flush()
  while client.server_info()[specs.TABLE].current_size < items:
    time.sleep(0.5)
  seconds = time.monotonic() - started
  for child in children:
    child.kill()  # mid-write: their last unsent items do not matter
    child.wait()
  return {"seconds": round(seconds, 1), "transitions_per_s": round(items / seconds)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=1_000_000, help="transitions in the table")
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint goes")
  parser.add_argument("--insert-rate", type=float, default=250.0, help="transitions/s")
  parser.add_argument("--sample-rate", type=float, default=2000.0, help="sampled items/s")
  parser.add_argument("--before", type=float, default=20.0, help="seconds measured before")
  parser.add_argument("--after", type=float, default=10.0, help="seconds measured after")
  parser.add_argument("--fill-writers", type=int, default=2)
  parser.add_argument("--record-steps", type=int, default=2000)
  parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
  parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.role == "inserter":
    address, recorded, rate, out = args.args
    return run_inserter(address, recorded, float(rate), out)
  if args.role == "sampler":
    address, rate, out = args.args
    return run_sampler(address, float(rate), out)

  free = shutil.disk_usage(args.dir).free
  if free < 2 * args.items * DISK_BYTES_PER_ITEM:
    sys.exit(
      f"{args.dir} has {free / 1e9:.1f} GB free; a checkpoint of {args.items} items may "
      f"need {args.items * DISK_BYTES_PER_ITEM / 1e9:.1f} GB (pass --dir)"
    )
  work = tempfile.mkdtemp(prefix="replay_checkpoint_", dir=args.dir)
  checkpoints, recorded = os.path.join(work, "checkpoints"), os.path.join(work, "recorded")
  os.makedirs(recorded)
  servers, children = [], []
  try:
    replay_scale.record_transitions(recorded, args.record_steps)
    server, address, empty_start_s = start_server(checkpoints, args.items)
    servers.append(server)
    client = reverb.Client(address)
    filled = fill(address, recorded, args.items, args.fill_writers)
    rss_full = rss_bytes(server.pid)

    children = [
      spawn("inserter", address, recorded, args.insert_rate, f"{work}/inserts.npy"),
      spawn("sampler", address, args.sample_rate, f"{work}/samples.npy"),
    ]
    poller = Poller(client, server.pid)
    time.sleep(args.before)
    cpu0 = replay_scale.process_cpu_s(server.pid)
    start = time.monotonic()
    path = client.checkpoint()
    end = time.monotonic()
    checkpoint_cpu = replay_scale.process_cpu_s(server.pid) - cpu0
    time.sleep(args.after)
    rows = poller.stop()
    for child in children:
      child.communicate("stop\n", timeout=120)
    inserts, samples = np.load(f"{work}/inserts.npy"), np.load(f"{work}/samples.npy")
    during = rows[(rows[:, 0] >= start) & (rows[:, 0] <= end + POLL_S)]
    on_disk = disk_bytes(checkpoints)
    server.kill()  # a crash: no checkpoint at shutdown
    server.wait()

    restart = time.monotonic()
    server, address, _ = start_server(checkpoints, args.items)
    servers.append(server)
    answered = time.monotonic() - restart
    restored = reverb.Client(address).server_info()[specs.TABLE].current_size
    next(iter(reverb.Client(address).sample(specs.TABLE, num_samples=1, emit_timesteps=False)))
    served = time.monotonic() - restart
  finally:
    for child in children:
      child.kill()
    for server in servers:
      server.kill()
      server.wait()
    shutil.rmtree(work, ignore_errors=True)

  print(
    json.dumps(
      {
        "benchmark": "replay_checkpoint",
        "env_id": ENV.env_id,
        "items": args.items,
        "fill": filled,
        "server_rss_full_bytes": rss_full,
        "checkpoint": {
          "seconds": round(end - start, 2),
          "bytes_on_disk": on_disk,
          "bytes_per_item": round(on_disk / args.items),
          "path_was": path,
          "server_cpu_s": round(checkpoint_cpu, 2),
          "server_rss_max_during_bytes": int(during[:, 3].max()) if len(during) else None,
        },
        "inserts": {
          "rate_asked": args.insert_rate,
          **stalls(inserts, start, end, args.before, replay_scale.NUM_ENVS),
          "server_counter_max_stall_during_s": counter_stalls(rows, 1, start, end),
          "server_counter_max_stall_before_s": counter_stalls(rows, 1, start - args.before, start),
        },
        "samples": {
          "rate_asked": args.sample_rate,
          **stalls(samples, start, end, args.before, replay_scale.SAMPLER_BATCH),
          "server_counter_max_stall_during_s": counter_stalls(rows, 2, start, end),
          "server_counter_max_stall_before_s": counter_stalls(rows, 2, start - args.before, start),
        },
        "server_info_max_latency_during_s": round(float(np.diff(during[:, 0]).max()), 3)
        if len(during) > 1
        else None,
        "restore": {
          "items_restored": restored,
          "start_empty_s": round(empty_start_s, 1),
          "answers_after_s": round(answered, 1),
          "serves_sample_after_s": round(served, 1),
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
      }
    )
  )


if __name__ == "__main__":
  main()
