"""Collector throughput against a bare loop of the same environments and policy.

Side by side in one process, alternating A B A B ... over the same native
AtariVectorEnv (8 Breakout environments by default):

  A  bare loop: the vector env plus the Nature CNN's batched epsilon-greedy
     action (the collector's own collect policy), no replay writes;
  B  the collector's real loop (collector.Collector._collect: pipelined
     driver, observer computing each item's priority and writing every
     transition to a real Reverb server in another process, policy and
     epsilon checks).

The ratio B/A of agent steps per second, pair by pair, is the collector's
efficiency; its median is the figure to quote (goal >= 0.90). Ratios within
one run are what to compare: the machine is shared and noisy.

    .venv/bin/python bench/collector_throughput.py [--num-envs 8] [--steps 400] [--rounds 5]

Prints one JSON object.
"""

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import threading
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import reverb

from dqnfleet.cli.up import free_port
from dqnfleet.collector.collector import Collector
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import envs, specs
from dqnfleet.core.rl.priorities import TdTarget
from dqnfleet.core.settings.config import CollectorConfig, EnvConfig, NetworkConfig
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import PLAINTEXT


def bare_loop(env, act, steps: int) -> float:
  """Agent steps per second of environments + policy alone."""
  started = time.perf_counter()
  time_step = env.reset()
  for _ in range(steps):
    time_step = env.step(act(time_step).action)
  return steps * env.batch_size / (time.perf_counter() - started)


def collector_loop(collector, env, observer, steps: int) -> float:
  """Agent steps per second of the collector's real loop, writing to replay."""
  collector.config.max_env_steps = collector.env_steps + steps * env.batch_size
  before = collector.env_steps
  started = time.perf_counter()
  collector._collect(env, observer)
  return (collector.env_steps - before) / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--env-id", default="ALE/Breakout-v5")
  parser.add_argument("--num-envs", type=int, default=8)
  parser.add_argument("--steps", type=int, default=400, help="batched steps per measurement")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  logging.basicConfig(level=logging.ERROR)
  env_config = EnvConfig(env_id=args.env_id)
  port, status_port = free_port(), free_port()
  total = args.num_envs * args.steps * (args.rounds + 1)
  # Below its min size the rate limiter lets every insert through.
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dqnfleet",
      "replay",
      f"--env-id={args.env_id}",
      f"--port={port}",
      f"--status-port={status_port}",
      f"--min-size={total + 1000}",
      f"--max-size={total + 1000}",
    ],
    stderr=subprocess.DEVNULL,
  )
  try:
    client = reverb.Client(f"localhost:{port}")
    rpc.retry(lambda: client.server_info(timeout=5), "connecting to the benchmark's replay")
    config = CollectorConfig(
      replay_addresses=(f"localhost:{port}",), num_envs=args.num_envs, seed=1
    )
    stop = threading.Event()
    # Its policy follower and summaries never start here: no trainer to reach.
    collector = Collector(
      env_config, NetworkConfig(), dataclasses.replace(config), "bench", stop, PLAINTEXT
    )
    env = envs.BatchedEnvironment(env_config, args.num_envs, seed=1)
    observer = ReplayObserver(
      [client], collector.specs, args.num_envs, lambda: 0, stop, specs.source_id("bench")
    )
    # Priorities as under a trainer's policy (without one they are constant).
    observer.td_target = TdTarget(gamma=0.99, reward_scale=1.0)
    bare_loop(env, collector.act, 50)  # trace the policy, warm up both paths
    collector_loop(collector, env, observer, 50)
    pairs = []
    for _ in range(args.rounds):
      a = bare_loop(env, collector.act, args.steps)
      b = collector_loop(collector, env, observer, args.steps)
      pairs.append((a, b))
    observer.close()
    env.close()
    items = client.server_info()[specs.TABLE].current_size
  finally:
    server.terminate()
    server.wait()
  ratios = [b / a for a, b in pairs]
  print(
    json.dumps(
      {
        "benchmark": "collector_throughput",
        "env_id": args.env_id,
        "num_envs": args.num_envs,
        "batched_steps_per_measurement": args.steps,
        "rounds": args.rounds,
        "bare_steps_per_s": [round(a) for a, _ in pairs],
        "collector_steps_per_s": [round(b) for _, b in pairs],
        "ratio_per_pair": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "goal": 0.90,
        "items_in_replay": items,
      }
    )
  )


if __name__ == "__main__":
  main()
