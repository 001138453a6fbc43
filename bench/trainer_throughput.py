"""Trainer train steps per second: one step per TensorFlow call versus several.

Fills a real Reverb table (loopback, in this process) with random transitions
of the chosen environment's layout, then times the trainer's real dataset and
DqnAgent three ways: sampling alone, one train step per Python call, and
learner.STEPS_PER_CALL steps inside one tf.function (what the trainer does).
The table is filled through the collectors' own writer (replay_io.RowWriter).
Ratios within one run are what to compare; the machine is shared and noisy.

    .venv/bin/python bench/trainer_throughput.py [--env-id CartPole-v1] [--steps 300] [--xla]

Prints one JSON object.
"""

import argparse
import json
import statistics
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import networks, replay_io, specs
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, is_atari
from dqnfleet.trainer.dataset import make_dataset
from dqnfleet.trainer.learner import STEPS_PER_CALL, make_agent


def fill(client, env_specs, items):
  layout = replay_io.ItemLayout.of(env_specs)
  writer = replay_io.RowWriter(client, layout)
  rng = np.random.default_rng(0)
  for t in range(items + layout.frame_rows):
    frame = rng.integers(0, 255, env_specs.frame.shape).astype(env_specs.frame.dtype)
    writer.append(**specs.row(frame, t % env_specs.num_actions, 1, 1, 0, 0))
    if t >= layout.frame_rows - 1:
      writer.create_item()
  writer.end_episode(timeout_ms=60_000)
  writer.close()


def rate(fn, steps):
  start = time.perf_counter()
  fn()
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--env-id", default="CartPole-v1")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--xla", action="store_true", help="also time the XLA-compiled train step")
  args = parser.parse_args()
  classic = not is_atari(args.env_id)
  env = flags.build(EnvConfig, None, {"DQNFLEET_ENV_ID": args.env_id}, classic_control=classic)
  agent_config = flags.build(AgentConfig, None, {}, classic_control=classic)
  net = flags.build(NetworkConfig, None, {}, classic_control=classic)
  env_specs = specs.env_specs(env)
  table = reverb.Table(
    specs.TABLE,
    reverb.selectors.Uniform(),
    reverb.selectors.Fifo(),
    max_size=100_000,
    rate_limiter=reverb.rate_limiters.MinSize(1),
    signature=specs.table_signature(env_specs),
  )
  server = reverb.Server([table])
  client = reverb.Client(f"localhost:{server.port}")
  fill(client, env_specs, 5_000)
  batch = agent_config.batch_size
  agent = make_agent(
    env_specs, networks.q_net(env_specs, net), agent_config, tf.Variable(0, dtype=tf.int64)
  )
  iterator = iter(make_dataset(f"localhost:{server.port}", env_specs, batch, 4, agent_config.gamma))

  k = STEPS_PER_CALL

  def k_steps_per_call(an_agent):
    @tf.function
    def train_k(it):
      loss = tf.constant(0.0)
      for _ in tf.range(k):
        loss = an_agent.train(next(it)[0]).loss
      return loss

    return train_k

  train_k = k_steps_per_call(agent)
  # The same train step compiled by XLA (jit_compile), for the --xla comparison.
  train_k_xla = k_steps_per_call(
    make_agent(
      env_specs,
      networks.q_net(env_specs, net),
      agent_config,
      tf.Variable(0, dtype=tf.int64),
      jit_compile=True,
    )
  )

  for _ in range(10):  # trace and warm up every path
    agent.train(next(iterator)[0])
  train_k(iterator)
  if args.xla:
    train_k_xla(iterator)
  n = args.steps
  sample = rate(lambda: [next(iterator) for _ in range(n)], n)
  one = rate(lambda: [agent.train(next(iterator)[0]) for _ in range(n)], n)
  many, xla = [], []
  for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both alike
    many.append(rate(lambda: [train_k(iterator) for _ in range(n // k)], (n // k) * k))
    if args.xla:
      xla.append(rate(lambda: [train_k_xla(iterator) for _ in range(n // k)], (n // k) * k))
  server.stop()
  result = {
    "benchmark": "trainer_throughput",
    "env_id": args.env_id,
    "batch_size": batch,
    "n_step": env_specs.n_step,
    "sampled_batches_per_s": round(sample, 1),
    "train_steps_per_s_one_per_call": round(one, 1),
    f"train_steps_per_s_{k}_per_call": [round(m, 1) for m in many],
    "speedup": round(statistics.median(many) / one, 2),
  }
  if args.xla:
    result["train_steps_per_s_xla"] = [round(x, 1) for x in xla]
    result["xla_over_default"] = round(statistics.median([x / m for x, m in zip(xla, many)]), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
