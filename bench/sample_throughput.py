"""The trainer's input path: items/s and CPU per item, sampling real replay shards, no training.

Starts real `dqnfleet replay` servers (1, 2 or 4 shards) as their own
processes, fills them with real Breakout transitions (random policy, 8
environments, written by the collectors' own observer), then reads them with
the trainer's real dataset code (trainer/dataset.py) and nothing else: no
train step. For each setting it prints items/s, CPU microseconds per item in
this process (the trainer's side: receiving, decompressing, checking,
assembling, batching) and in the replay processes, items per second per
trainer core (items / this process's CPU seconds), and the replay's resident
bytes per transition after the fill.

Settings: the frame column's chunk length (written by the collectors, so each
gets its own fill), shards, batch size, sampling workers per shard, and the
same pipeline run by input workers (tf.data service, trainer/input_service.py:
the trainer's dispatcher in this process and 1 or 2 `dqnfleet input-worker`
processes; the trainer receives finished batches).
Ratios within one run are what to compare; the machine is shared and noisy.

    .venv/bin/python bench/sample_throughput.py [--seconds 8] [--transitions 20000]
        [--only default,reverb,chunk,pipeline,shards]

Prints one JSON object.
"""

import argparse
import inspect
import json
import subprocess
import sys
import threading
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import psutil
import replay_scale  # bench/, next to this file
import reverb
import tensorflow as tf
from replay_memory import acting, write_random_play
from replay_scale import ENV, LIMITER_FLAGS, NUM_ENVS, process_cpu_s

from dqnfleet.cli.up import free_port
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.settings.config import AgentConfig, TrainerConfig
from dqnfleet.trainer import dataset as trainer_dataset
from dqnfleet.trainer.input_service import Dispatcher

GAMMA = AgentConfig().gamma
PREFETCH = TrainerConfig().prefetch_batches  # the trainer's default


def start_shards(count: int, transitions: int) -> list[tuple[subprocess.Popen, str]]:
  """`count` replay servers whose rate limiter never holds this benchmark back."""
  flags = LIMITER_FLAGS + ["--min-size=1000", f"--max-size={transitions * 2}"]
  return [replay_scale.start_server(flags) for _ in range(count)]


def fill(shards, transitions: int, frame_chunk_rows: int) -> float:
  """Real Breakout transitions into the shards; the servers' RSS growth per item."""
  clients = [reverb.Client(address) for _, address in shards]
  rss = lambda: sum(psutil.Process(p.pid).memory_info().rss for p, _ in shards)
  time.sleep(1.0)
  before = rss()
  env_specs = specs.env_specs(ENV)
  layout = replay_io.ItemLayout(env_specs.stack, env_specs.n_step, frame_chunk_rows)
  observer = acting(
    ReplayObserver(clients, env_specs, NUM_ENVS, lambda: 0, threading.Event(), 1, layout=layout)
  )
  write_random_play(observer, transitions, NUM_ENVS)
  items = sum(c.server_info()[specs.TABLE].current_size for c in clients)
  time.sleep(1.0)
  return (rss() - before) / items


def make_dataset(addresses: list[str], batch: int, workers: int | None, service: str = ""):
  """The trainer's dataset over `addresses`, mixed by their (equal) sizes. `workers` (sampling
  workers per shard) and `service` (its input workers' dispatcher) only where this commit's
  dataset takes them."""
  env_specs = specs.env_specs(ENV)
  weights = tf.Variable(tf.ones([len(addresses)], tf.float64), trainable=False)
  knobs = {"gamma": GAMMA, "workers_per_shard": workers, "input_service": service or None}
  accepted = inspect.signature(trainer_dataset.make_sharded_dataset).parameters
  return trainer_dataset.make_sharded_dataset(
    dict(enumerate(addresses)),
    weights,
    env_specs,
    batch,
    PREFETCH,
    **{k: v for k, v in knobs.items() if k in accepted and v is not None},
  )


def reverb_alone(addresses: list[str], batch: int):
  """Reverb's own part of the path, the floor under any dataset code: its sampler's items
  (received, decompressed, the item's tensors cut from its chunks), batched, nothing else."""
  signature = specs.replay_signature(specs.env_specs(ENV))
  dataset = reverb.TrajectoryDataset(
    server_address=addresses[0],
    table=specs.TABLE,
    dtypes=tf.nest.map_structure(lambda s: s.dtype, signature),
    shapes=tf.nest.map_structure(lambda s: s.shape, signature),
    max_in_flight_samples_per_worker=2 * batch,
    rate_limiter_timeout_ms=trainer_dataset.SAMPLE_TIMEOUT_MS,
  )
  return dataset.batch(batch).map(lambda s: (s.data["frames"], s.info.key)).prefetch(PREFETCH)


def item_count(batch) -> tf.Tensor:
  return tf.shape(batch[-1])[0]  # the batch's item rows: the last element in every commit


def measure(dataset, seconds: float, shards, others=()) -> dict:
  """Pulls batches for `seconds` inside one tf.function loop, as the learner does."""
  iterator = iter(dataset)

  @tf.function
  def pull(n):
    items = tf.constant(0)
    for _ in tf.range(n):
      items += item_count(next(iterator))
    return items

  pull(tf.constant(20))  # trace, fill the prefetch buffer, open every stream
  servers = [p.pid for p, _ in shards]
  helpers = [p.pid for p in others]
  cpu = lambda pids: sum(process_cpu_s(pid) for pid in pids)
  own, remote, helped = time.process_time(), cpu(servers), cpu(helpers)
  started = time.perf_counter()
  items = 0
  while time.perf_counter() - started < seconds:
    items += int(pull(tf.constant(10)))
  wall = time.perf_counter() - started
  own, remote = time.process_time() - own, cpu(servers) - remote
  numbers = {
    "items_per_s": round(items / wall),
    "trainer_cpu_us_per_item": round(own / items * 1e6, 1),
    "replay_cpu_us_per_item": round(remote / items * 1e6, 1),
    "items_per_s_per_trainer_core": round(items / own),
  }
  if helpers:
    numbers["service_cpu_us_per_item"] = round((cpu(helpers) - helped) / items * 1e6, 1)
  return numbers


def start_service(workers: int) -> tuple[list, Dispatcher]:
  """The trainer's tf.data service dispatcher, in this process as in the trainer, and
  `workers` `dqnfleet input-worker` processes registered with it."""
  dispatcher = Dispatcher(0)
  children = [
    subprocess.Popen(
      [sys.executable, "-m", "dqnfleet", "input-worker", f"--port={free_port()}"]
      + [f"--dispatcher-address=localhost:{dispatcher.port}", f"--status-port={free_port()}"]
      + ["--metrics-port=-1"],
      stderr=subprocess.DEVNULL,
    )
    for _ in range(workers)
  ]
  return children, dispatcher


def stop(children) -> None:
  for child in children:
    child.terminate()
  for child in children:
    child.wait()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=8.0, help="measured per setting")
  parser.add_argument("--transitions", type=int, default=20_000)
  parser.add_argument(
    "--chunk-rows",
    type=int,
    default=replay_io.FRAME_CHUNK_ROWS,
    help="the frame chunk length of the pipeline and shard settings",
  )
  parser.add_argument(
    "--only", default="chunk,pipeline,shards", help="which groups of settings to run"
  )
  args = parser.parse_args()
  groups = set(args.only.split(","))
  results = []

  def run(group, shards, chunk, variants=((32, None, 0),)):
    """One fill of `shards` at `chunk`, then each (batch, workers per shard, service workers)."""
    tables = start_shards(shards, args.transitions)
    # Services start before the fill, which gives their workers time to import TensorFlow
    # and register with the dispatcher.
    services = {s: start_service(s) for _, _, s in variants if s}
    try:
      bytes_per_transition = fill(tables, args.transitions, chunk)
      for batch, workers, service_workers in variants:
        addresses = [a for _, a in tables]
        children, dispatcher = services.get(service_workers, ((), None))
        if workers == "reverb":
          dataset, workers = reverb_alone(addresses, batch), None
        else:  # the trainer's dataset, on the input workers if there are any
          dataset = make_dataset(addresses, batch, workers, dispatcher and dispatcher.target)
        if dispatcher:
          while dispatcher.workers() < service_workers:  # they import TensorFlow
            time.sleep(0.5)
        try:
          numbers = measure(dataset, args.seconds, tables, children)
        except tf.errors.OpError as e:  # recorded: whether the service runs this pipeline at all
          numbers = {"error": f"{type(e).__name__}: {e.message.splitlines()[0][:300]}"}
        finally:
          stop(children)
        results.append(
          {"group": group, "shards": shards, "frame_chunk_rows": chunk, "batch": batch}
          | {"workers_per_shard": workers, "service_workers": service_workers}
          | numbers
          | {"replay_bytes_per_transition": round(bytes_per_transition)}
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    finally:
      stop([p for p, _ in tables] + [c for children, _ in services.values() for c in children])

  if "reverb" in groups:  # Reverb's sampler alone at the longest and shortest frame chunks
    for chunk in (32, 4):
      run("reverb", 1, chunk, ((32, "reverb", 0),))
  if "default" in groups:  # the trainer's defaults only: for before/after runs
    run("default", 1, args.chunk_rows)
  if "chunk" in groups:
    for chunk in (32, 16, 8, 4):
      run("chunk", 1, chunk)
  if "pipeline" in groups:
    # batch 256; sampling workers per shard; the same pipeline on tf.data service workers
    variants = [(256, None, 0), (32, 1, 0), (32, 2, 0), (32, 4, 0), (32, None, 1), (32, None, 2)]
    run("pipeline", 1, args.chunk_rows, variants)
  if "shards" in groups:
    for shards in (2, 4):
      run("shards", shards, args.chunk_rows)
  print(
    json.dumps(
      {
        "benchmark": "sample_throughput",
        "env_id": ENV.env_id,
        "n_step": specs.env_specs(ENV).n_step,
        "transitions": args.transitions,
        "seconds_per_setting": args.seconds,
        "results": results,
        "goal_items_per_s_per_trainer_core": 25_000,
      }
    )
  )


if __name__ == "__main__":
  main()
