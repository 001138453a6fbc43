"""Where the trainer's time goes: its train step against a plain Keras step of the same network.

Eight ways to take a Breakout Double-DQN train step (Nature CNN, batch 32,
Adam, Huber loss, 3-step targets), timed in alternating rounds in one
process so that drift on a shared machine hits all alike:

  plain      a plain Keras step (no TF-Agents, no replay): channels-last
             Conv2D network, online and target network, batches gathered
             from observations held in memory, STEPS_PER_CALL steps per
             tf.function call as the trainer takes them;
  plain_bf16 the same under Keras' mixed_bfloat16 policy (bf16 compute,
             fp32 weights);
  plain_qnet the plain step on the trainer's own network (core/rl/networks.py:
             frames stacked first, StackedFramesConv) instead of the
             channels-last Conv2D one: what the network costs, apart from
             the agent;
  plain_qnet_2d the same network with its stacked-frames layer as a
             transpose and a 2-D convolution (what it runs without oneDNN):
             which of the layer's two forms is faster on this CPU;
  agent      the trainer's TF-Agents DqnAgent and network (learner.make_agent)
             training on one batch held in memory: the agent's overhead;
  agent_bf16 the same with the network in bf16 (networks.q_net, precision bf16);
  trainer    the real Trainer (trainer.Trainer: replay source, dataset,
             learner) sampling a full Reverb table on loopback, in the same
             process, in fp32: the trainer alone;
  trainer_bf16 the same Trainer with --precision bf16.

Prints one JSON object: train steps per second of each, round by round, and
each one's median ratio to `plain` pair by pair (the issue's goals: trainer
>= 0.95 of plain alone; inside `make run`, bench/learning_run.py records the
fleet's rate).

    .venv/bin/python bench/train_step_breakdown.py [--steps 200] [--rounds 5] [--ways plain,agent]
"""

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import numpy as np
import reverb
import tensorflow as tf
from trainer_throughput import fill  # bench/ is on sys.path when a script of it runs

from dqnfleet.core.rl import networks, specs
from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, TrainerConfig
from dqnfleet.trainer.learner import STEPS_PER_CALL, make_agent
from dqnfleet.trainer.trainer import Trainer

WAYS = (
  "plain",
  "plain_bf16",
  "plain_qnet",
  "plain_qnet_2d",
  "agent",
  "agent_bf16",
  "trainer",
  "trainer_bf16",
)


def keras_nature_cnn(num_actions: int) -> tf.keras.Model:
  """The Nature CNN as plain Keras layers, on channels-last [B, 84, 84, 4] uint8 pixels."""
  return tf.keras.Sequential(
    [
      tf.keras.layers.InputLayer((84, 84, 4), dtype=tf.uint8),
      tf.keras.layers.Lambda(lambda x: tf.cast(x, tf.float32) / 255.0),
      tf.keras.layers.Conv2D(32, 8, 4, activation="relu"),
      tf.keras.layers.Conv2D(64, 4, 2, activation="relu"),
      tf.keras.layers.Conv2D(64, 3, 1, activation="relu"),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(512, activation="relu"),
      tf.keras.layers.Dense(num_actions, dtype=tf.float32),
    ]
  )


class QValues(tf.keras.Model):
  """The trainer's QNetwork as a model of Q-values alone."""

  def __init__(self, q_network):
    super().__init__()
    self.q_network = q_network

  def call(self, observations):
    return self.q_network(observations)[0]


def plain_step(network, config: AgentConfig, gamma_n: float, pool: tf.Tensor):
  """A plain Double-DQN step function of `network()`, STEPS_PER_CALL steps a call.

  `network()` builds a model mapping a batch of `pool`'s observations to
  their [B, A] Q-values.
  """
  online, target = network(), network()
  num_actions = int(online(pool[:1]).shape[-1])
  target.set_weights(online.get_weights())
  optimizer = tf.keras.optimizers.Adam(config.learning_rate, epsilon=config.adam_epsilon)
  huber = tf.keras.losses.Huber(reduction=tf.keras.losses.Reduction.NONE)
  batch = config.batch_size
  size = int(pool.shape[0])

  @tf.function
  def steps():
    loss = tf.constant(0.0)
    for _ in tf.range(STEPS_PER_CALL):
      index = tf.random.uniform([2, batch], 0, size, tf.int32)
      first, last = tf.gather(pool, index[0]), tf.gather(pool, index[1])
      actions = tf.random.uniform([batch], 0, num_actions, tf.int32)
      rewards = tf.random.uniform([batch])
      next_actions = tf.argmax(online(last), axis=-1, output_type=tf.int32)
      next_q = tf.gather(target(last), next_actions, batch_dims=1)
      targets = tf.stop_gradient(rewards + gamma_n * next_q)
      with tf.GradientTape() as tape:
        q = tf.gather(online(first), actions, batch_dims=1)
        loss = tf.reduce_mean(huber(targets[:, None], q[:, None]))
      grads = tape.gradient(loss, online.trainable_variables)
      optimizer.apply_gradients(zip(grads, online.trainable_variables))
    return loss

  return steps


def with_2d_stacked_frames(network):
  """`network` with its stacked-frames layer in its transposed 2-D form (set before the
  first trace: the layer reads it when traced)."""
  for layer in network.submodules:
    if isinstance(layer, networks.StackedFramesConv):
      layer.conv3d = False
  return network


def rate(fn, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return calls * STEPS_PER_CALL / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="train steps per way and round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--items", type=int, default=20_000, help="items in the replay table")
  parser.add_argument(
    "--ways", default="", help="comma-separated ways to time (default: all; plain always runs)"
  )
  args = parser.parse_args()
  chosen = set(filter(None, args.ways.split(","))) | {"plain"} if args.ways else set(WAYS)
  if chosen - set(WAYS):
    parser.error(f"--ways: unknown {sorted(chosen - set(WAYS))}; known: {', '.join(WAYS)}")
  env = flags.build(EnvConfig, None, {"DQNFLEET_ENV_ID": "ALE/Breakout-v5"})
  agent_config = flags.build(AgentConfig, None, {})
  net = flags.build(NetworkConfig, None, {})
  env_specs = specs.env_specs(env)
  gamma_n = agent_config.gamma**env_specs.n_step
  calls = max(1, args.steps // STEPS_PER_CALL)

  # The trainer alone, on a full table whose rate limiter never holds it back.
  table = reverb.Table(
    specs.TABLE,
    reverb.selectors.Uniform(),
    reverb.selectors.Fifo(),
    max_size=args.items * 2,
    rate_limiter=reverb.rate_limiters.MinSize(1),
    signature=specs.table_signature(env_specs),
  )
  server = reverb.Server([table])
  address = f"localhost:{server.port}"
  began = time.perf_counter()
  fill(reverb.Client(address), env_specs, args.items)
  print(f"{args.items} items in replay in {time.perf_counter() - began:.1f} s", file=sys.stderr)
  stop = threading.Event()
  trainers: dict[str, Trainer] = {}  # by precision, started when a chosen way needs one
  with tempfile.TemporaryDirectory() as run_dir:

    def trainer(precision: str) -> Trainer:
      if precision not in trainers:
        trainers[precision] = Trainer(
          env,
          net,
          agent_config,
          TrainerConfig(
            replay_addresses=(address,),
            port=0,
            run_dir=f"{run_dir}/{precision}",
            precision=precision,
          ),
          stop,
        )
        trainers[precision].replay.connect()
        trainers[precision].replay.start()
      return trainers[precision]

    @functools.cache
    def held():
      """One batch held in memory, for the agent ways: no input pipeline."""
      return next(trainer("fp32").replay.iterator)[0]

    def agent_steps(precision: str):
      agent = make_agent(
        env_specs,
        networks.q_net(env_specs, net, precision),
        agent_config,
        tf.Variable(0, dtype=tf.int64),
      )
      batch = held()

      @tf.function
      def steps():
        loss = tf.constant(0.0)
        for _ in tf.range(STEPS_PER_CALL):
          loss = agent.train(batch).loss
        return loss

      return steps

    rng = np.random.default_rng(1)
    pixels = tf.constant(rng.integers(0, 255, (1024, 84, 84, 4), dtype=np.uint8))
    stacked = tf.constant(rng.integers(0, 255, (1024, *env_specs.observation.shape), np.uint8))
    cnn = lambda: keras_nature_cnn(env_specs.num_actions)

    def plain_bf16():
      tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
      try:
        return plain_step(cnn, agent_config, gamma_n, pixels)
      finally:
        tf.keras.mixed_precision.set_global_policy("float32")

    builders = {  # each builds its way's step function; WAYS names them in this order
      "plain": lambda: plain_step(cnn, agent_config, gamma_n, pixels),
      "plain_bf16": plain_bf16,
      "plain_qnet": lambda: plain_step(
        lambda: QValues(networks.q_net(env_specs, net)), agent_config, gamma_n, stacked
      ),
      "plain_qnet_2d": lambda: plain_step(
        lambda: QValues(with_2d_stacked_frames(networks.q_net(env_specs, net))),
        agent_config,
        gamma_n,
        stacked,
      ),
      "agent": lambda: agent_steps("fp32"),
      "agent_bf16": lambda: agent_steps("bf16"),
      "trainer": lambda: functools.partial(trainer("fp32").learner.step, STEPS_PER_CALL),
      "trainer_bf16": lambda: functools.partial(trainer("bf16").learner.step, STEPS_PER_CALL),
    }
    assert tuple(builders) == WAYS
    ways = {name: builders[name]() for name in WAYS if name in chosen}
    for name, fn in ways.items():  # trace and warm up every way
      began = time.perf_counter()
      for _ in range(3):
        fn()
      print(f"{name}: traced and warmed up in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    rates = {name: [] for name in ways}
    for _ in range(args.rounds):
      for name, fn in ways.items():
        rates[name].append(round(rate(fn, calls), 1))
        print(f"{name}: {rates[name][-1]} train steps/s", file=sys.stderr)
    stop.set()
    for started in trainers.values():
      started.replay.close()
  server.stop()
  ratio = lambda name: round(
    statistics.median(a / b for a, b in zip(rates[name], rates["plain"])), 3
  )
  print(
    json.dumps(
      {
        "benchmark": "train_step_breakdown",
        "batch_size": agent_config.batch_size,
        "n_step": env_specs.n_step,
        "steps_per_call": STEPS_PER_CALL,
        "train_steps_per_s": rates,
        "median_ratio_to_plain": {name: ratio(name) for name in ways if name != "plain"},
        "cpu_bf16": networks.cpu_has_bf16(),
      }
    )
  )


if __name__ == "__main__":
  main()
