"""Replay-server memory per Breakout transition, ours versus stored (s, s') pairs.

Starts the real `dqnfleet replay` service as its own process, writes real
Breakout transitions (random policy, 8 environments) through the collector's
observer, and reads the server's resident memory before and after. The same is
done with a naive layout that stores both stacked observations per item, so
the two numbers can be compared as a ratio within one run.

    .venv/bin/python bench/replay_memory.py [--transitions 20000]

Prints one JSON object.
"""

import argparse
import json
import subprocess
import sys
import threading
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import numpy as np
import psutil
import reverb
from tf_agents.drivers import py_driver
from tf_agents.policies import random_py_policy
from tf_agents.trajectories import time_step as ts

from dqnfleet.cli.up import free_port
from dqnfleet.collector.observer import ReplayObserver
from dqnfleet.core.rl import envs, specs
from dqnfleet.core.settings.config import EnvConfig
from dqnfleet.core.transport import rpc

ENV = EnvConfig(env_id="ALE/Breakout-v5")
NUM_ACTIONS = 4  # Breakout's


class NaiveObserver:
  """Stores (s_t, a, r, d, s_t+1) as one item: what a simple design would do."""

  def __init__(self, client, num_envs):
    self._writer = client.writer(max_sequence_length=1)
    self.items_written = 0

  def __call__(self, transition):
    time_step, action_step, next_time_step = transition
    for i in range(len(time_step.step_type)):
      if time_step.step_type[i] == ts.StepType.LAST:
        continue
      self._writer.append(
        (
          time_step.observation[i],
          next_time_step.observation[i],
          np.int64(action_step.action[i]),
          np.float32(next_time_step.reward[i]),
        )
      )
      self._writer.create_item("naive", 1, 1.0)
      self.items_written += 1

  def close(self):
    self._writer.close()


def acting(observer: ReplayObserver):
  """The observer as a TF-Agents transition observer of a random policy: the collect
  policy's Q-values and epsilons (collector.Collector.act), zeros here, added."""

  def observe(transition):
    time_step, action_step, next_time_step = transition
    num_envs = len(time_step.step_type)
    q_values = np.zeros((num_envs, NUM_ACTIONS))
    info = {"q_values": q_values, "epsilon": np.zeros(num_envs, np.float32)}
    observer((time_step, action_step._replace(info=info), next_time_step), q_values)

  observe.close = observer.close
  return observe


def write_random_play(observer, transitions: int, num_envs: int) -> float:
  """`transitions` agent steps of real Breakout environments under a random policy, each
  batch handed to `observer`, which is closed after; the seconds it took."""
  env = envs.BatchedEnvironment(ENV, num_envs, seed=1)
  policy = random_py_policy.RandomPyPolicy(
    env.time_step_spec(), env.action_spec(), outer_dims=(num_envs,)
  )
  started = time.monotonic()
  py_driver.PyDriver(env, policy, [], transition_observers=[observer], max_steps=transitions).run(
    env.reset()
  )
  observer.close()
  elapsed = time.monotonic() - started
  env.close()
  return elapsed


def run_naive_server(port):
  """A Reverb server process with a signature-less table for the naive layout."""
  code = (
    f"import reverb, time; s = reverb.Server([reverb.Table('naive', reverb.selectors.Uniform(),"
    f" reverb.selectors.Fifo(), 10**7, reverb.rate_limiters.MinSize(1))], port={port});"
    " time.sleep(10**6)"
  )
  return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)


def measure(layout: str, transitions: int, num_envs: int) -> dict:
  port, status_port = free_port(), free_port()
  if layout == "dqnfleet":
    server = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "dqnfleet",
        "replay",
        f"--env-id={ENV.env_id}",
        f"--port={port}",
        f"--status-port={status_port}",
        # Below min size the rate limiter lets every insert through.
        f"--min-size={transitions * 2}",
        f"--max-size={transitions * 2}",
      ],
      stderr=subprocess.DEVNULL,
    )
  else:
    server = run_naive_server(port)
  client = reverb.Client(f"localhost:{port}")
  rpc.retry(lambda: client.server_info(timeout=5), "connecting to the benchmark's replay")
  time.sleep(1.0)
  before = psutil.Process(server.pid).memory_info().rss
  env_specs = specs.env_specs(ENV)
  observer = (
    acting(ReplayObserver([client], env_specs, num_envs, lambda: 0, threading.Event(), 1))
    if layout == "dqnfleet"
    else NaiveObserver(client, num_envs)
  )
  elapsed = write_random_play(observer, transitions, num_envs)
  size = sum(t.current_size for t in client.server_info().values())
  time.sleep(1.0)
  after = psutil.Process(server.pid).memory_info().rss
  server.terminate()
  server.wait()
  return {
    "items": size,
    "rss_growth_bytes": after - before,
    "bytes_per_transition": (after - before) / size,
    "write_seconds": elapsed,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--transitions", type=int, default=20_000)
  parser.add_argument("--num-envs", type=int, default=8)
  args = parser.parse_args()
  ours = measure("dqnfleet", args.transitions, args.num_envs)
  naive = measure("naive", args.transitions, args.num_envs)
  print(
    json.dumps(
      {
        "benchmark": "replay_memory",
        "env_id": ENV.env_id,
        "transitions": args.transitions,
        "dqnfleet": ours,
        "naive_pairs": naive,
        "naive_over_dqnfleet": naive["bytes_per_transition"] / ours["bytes_per_transition"],
        "goal_bytes_per_transition": 1536,
      }
    )
  )


if __name__ == "__main__":
  main()
