"""Trainer train steps per second: one step per TensorFlow call versus several.

Fills a real Reverb table (loopback, in this process) with random transitions
of the chosen environment's layout, then times the trainer's real dataset and
DqnAgent three ways: sampling alone, one train step per Python call, and
trainer.STEPS_PER_CALL steps inside one tf.function (what the trainer does).
Ratios within one run are what to compare; the machine is shared and noisy.

    .venv/bin/python bench/trainer_throughput.py [--env-id CartPole-v1] [--steps 300]

Prints one JSON object.
"""
import argparse
import json
import time

from dqnfleet.core import runtime

runtime.quiet_imports()  # before TensorFlow is imported

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core import networks, settings, specs
from dqnfleet.core.config import AgentConfig, EnvConfig, NetworkConfig, is_atari
from dqnfleet.trainer import trainer as trainer_lib
from dqnfleet.trainer.dataset import make_dataset
from dqnfleet.trainer.learner import make_agent


def fill(client, env_specs, items):
  writer = client.trajectory_writer(num_keep_alive_refs=env_specs.stack + 1)
  rng = np.random.default_rng(0)
  for t in range(items + env_specs.stack):
    frame = rng.integers(0, 255, env_specs.frame.shape).astype(env_specs.frame.dtype)
    writer.append(specs.row(frame, t % env_specs.num_actions, 1, 1, 0, 0))
    if t >= env_specs.stack:
      writer.create_item(specs.TABLE, 1.0, specs.item(writer.history, env_specs.stack))
  writer.end_episode()


def rate(fn, steps):
  start = time.perf_counter()
  fn()
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--env-id", default="CartPole-v1")
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  env = EnvConfig(env_id=args.env_id)
  classic = not is_atari(args.env_id)
  agent_config = settings.build(AgentConfig, None, {}, classic_control=classic)
  net = settings.build(NetworkConfig, None, {}, classic_control=classic)
  env_specs = specs.env_specs(env)
  table = reverb.Table(specs.TABLE, reverb.selectors.Uniform(), reverb.selectors.Fifo(),
                       max_size=100_000, rate_limiter=reverb.rate_limiters.MinSize(1),
                       signature=specs.replay_signature(env_specs))
  server = reverb.Server([table])
  client = reverb.Client(f"localhost:{server.port}")
  fill(client, env_specs, 5_000)
  batch = agent_config.batch_size
  agent = make_agent(env_specs, networks.q_net(env_specs, net), agent_config,
                     tf.Variable(0, dtype=tf.int64))
  iterator = iter(make_dataset(f"localhost:{server.port}", env_specs, batch, 4))

  k = trainer_lib.STEPS_PER_CALL

  @tf.function
  def train_k(it):
    loss = tf.constant(0.0)
    for _ in tf.range(k):
      loss = agent.train(next(it)[0]).loss
    return loss

  for _ in range(10):  # trace and warm up both paths
    agent.train(next(iterator)[0])
  train_k(iterator)
  n = args.steps
  sample = rate(lambda: [next(iterator) for _ in range(n)], n)
  one = rate(lambda: [agent.train(next(iterator)[0]) for _ in range(n)], n)
  many = rate(lambda: [train_k(iterator) for _ in range(n // k)], (n // k) * k)
  server.stop()
  print(json.dumps({"benchmark": "trainer_throughput", "env_id": args.env_id, "batch_size": batch,
                    "sampled_batches_per_s": round(sample, 1),
                    "train_steps_per_s_one_per_call": round(one, 1),
                    f"train_steps_per_s_{k}_per_call": round(many, 1),
                    "speedup": round(many / one, 2)}))


if __name__ == "__main__":
  main()
