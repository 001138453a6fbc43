"""The learner: the TF-Agents DQN (or Double DQN) agent and how it steps on replay batches.

A `Learner` owns the agent, its Q-network and train-step variable, and the
one TensorFlow graph that runs several train steps per call. It takes
batches from, and sends priorities back to, a replay source
(trainer/replay_source.py); `step()` says what happened as a `StepResult`.
When to publish, checkpoint and report is the loop's (trainer/trainer.py).
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tf_agents.agents.dqn import dqn_agent
from tf_agents.utils import common

from dqnfleet.core.rl import networks
from dqnfleet.core.rl.priorities import PRIORITY_FLOOR  # the collectors' too
from dqnfleet.core.rl.specs import EnvSpecs
from dqnfleet.core.settings.config import AgentConfig, NetworkConfig
from dqnfleet.trainer.dataset import ITEM_COLUMNS, KEY, PROBLEM, SHARD

# Train steps per call into TensorFlow: one graph runs several steps, which
# gives about 1.5x the steps/s of small networks (see docs/performance.md).
STEPS_PER_CALL = 10


def make_optimizer(config: AgentConfig) -> tf.keras.optimizers.Optimizer:
  if config.optimizer == "rmsprop":
    # The Nature-DQN flavour of RMSprop (as in TF-Agents' Atari example).
    return tf.keras.optimizers.RMSprop(
      config.learning_rate, rho=0.95, momentum=0.0, epsilon=0.01, centered=True
    )
  return tf.keras.optimizers.Adam(config.learning_rate, epsilon=config.adam_epsilon)


def importance_weights(info, exponent: float) -> tf.Tensor:
  """Prioritized replay's correction (N * P(i))^-exponent, scaled so the largest is 1."""
  weights = tf.pow(tf.cast(info.table_size, tf.float64) * info.probability, -exponent)
  return tf.cast(weights / tf.reduce_max(weights), tf.float32)


def make_agent(
  env_specs: EnvSpecs,
  q_network: tf.keras.Model,
  config: AgentConfig,
  train_step: tf.Variable,
  jit_compile: bool = False,
) -> dqn_agent.DqnAgent:
  """The agent trains `q_network` in place; the trainer publishes its weights."""
  agent_class = dqn_agent.DdqnAgent if config.double_dqn else dqn_agent.DqnAgent
  agent = agent_class(
    env_specs.time_step,
    env_specs.action,
    q_network=q_network,
    optimizer=make_optimizer(config),
    # Collectors build their own epsilon-greedy policy (core/rl/networks.py);
    # the agent's collect policy is never used.
    epsilon_greedy=0.0,
    target_update_period=config.target_update_period,
    target_update_tau=config.target_update_tau,
    td_errors_loss_fn=(
      common.element_wise_huber_loss
      if config.td_loss == "huber"
      else common.element_wise_squared_loss
    ),
    reward_scale_factor=config.reward_scale,
    gamma=config.gamma,
    # Items carry n transitions (core/rl/specs.py); the dataset hands each to
    # the agent as one n-step Transition (trainer/dataset.py), which it
    # bootstraps from the n-th next observation.
    n_step_update=env_specs.n_step,
    gradient_clipping=config.gradient_clipping or None,
    train_step_counter=train_step,
  )
  agent.initialize()
  agent.train = common.function(agent.train, autograph=False, jit_compile=jit_compile)
  return agent


class StepResult(NamedTuple):
  """What one `Learner.step` call did, read back from the graph once.

  Batch-sized fields are those of the newest batch of the call; before any
  step ran they are zeros.
  """

  steps: int  # train steps that ran: the train step moved by this many
  timed_out: bool  # sampling waited too long (no data, or the rate limiter waits
  # for collectors); the steps before it still count
  loss: float  # TD loss of the newest step (0.0 if none ran)
  mean_q: float  # mean greedy Q-value of the call's last step's batch (0.0 if the
  # call ended early: it costs a forward pass, so once per call)
  policy_versions: np.ndarray  # [B] the versions that collected the newest sampled batch
  keys: np.ndarray  # [B] uint64: the replay keys of the newest batch trained on (a row
  # standing in for an invalid item names that item)
  shards: np.ndarray  # [B] int64: the replay shard that holds each of them
  td_errors: np.ndarray  # [B] its TD errors; prioritized replay received |td| + floor
  problems: np.ndarray  # [P, 3] int64: (key bits, dataset.PROBLEMS code, shard) of every
  # invalid item left out; the replay source deletes them


class Learner:
  """The agent and its train graph; batches come from `replay`, priorities go back to it.

  `replay` is the trainer's replay source: `iterator` (the dataset's
  current iterator, which it rebuilds after a timeout or an error),
  `prioritized` (read once the source has connected, before the first
  step traces the graph) and `update_priorities(keys, priorities, shards)`,
  called inside the graph with the shard each item came from.
  """

  def __init__(
    self,
    env_specs: EnvSpecs,
    net: NetworkConfig,
    config: AgentConfig,
    replay,
    precision: str = "fp32",
  ):
    self.specs = env_specs
    self.train_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step")
    self.precision = precision  # "fp32" or "bf16" (networks.resolve_precision)
    self.q_network = networks.q_net(env_specs, net, precision)
    self.agent = make_agent(env_specs, self.q_network, config, self.train_step)
    self.batch_size = config.batch_size
    self.importance_exponent = config.importance_exponent
    self._replay = replay
    self._graph = tf.function(self._train_steps)

  @property
  def train_steps(self) -> int:
    return int(self.train_step.numpy())

  def trace(self) -> None:
    """Builds the train graph now, without data, so that the first step() need not.

    Tracing holds the GIL for seconds; done before the first publication, it
    does not coincide with the herd of downloads that publication sets off,
    which the gRPC server's event loop serves in the same process.
    """
    self._graph.get_concrete_function(self._replay.iterator, tf.TensorSpec([], tf.int32))

  def step(self, steps: int) -> StepResult:
    """Up to `steps` train steps in one graph call (see StepResult).

    Errors of sampling (an unreadable item, a lost server) propagate: the
    replay source tells them apart. Steps that ran before one still moved
    the train step. So does a call the replay source cancels (it waited on
    a lost shard), which may end within a step, after some of its updates.
    """
    done, timed_out, loss, mean_q, versions, keys, shards, td_errors, problems = self._graph(
      self._replay.iterator, tf.constant(steps)
    )
    return StepResult(
      steps=int(done),
      timed_out=bool(timed_out),
      loss=float(loss),
      mean_q=float(mean_q),
      policy_versions=versions.numpy(),
      keys=keys.numpy(),
      shards=shards.numpy(),
      td_errors=td_errors.numpy(),
      problems=problems.numpy(),
    )

  def _train_steps(self, iterator, steps):
    """Up to `steps` train steps in one TensorFlow graph.

    A batch of invalid items only is not trained on; `problems` lists the
    (key, problem) of every invalid item seen. An empty optional, unlike an
    exception, leaves no half-run step behind: the train step counter moves
    only with real steps.
    """
    done = tf.constant(0)
    loss = tf.constant(0.0)
    mean_q = tf.constant(0.0)
    versions = tf.zeros([self.batch_size], tf.int64)
    keys = tf.zeros([self.batch_size], tf.uint64)
    shards = tf.zeros([self.batch_size], tf.int64)
    td_errors = tf.zeros([self.batch_size], tf.float32)
    problems = tf.zeros([0, ITEM_COLUMNS], tf.int64)  # rows of the invalid items left out
    timed_out = tf.constant(False)
    for i in tf.range(steps):
      tf.autograph.experimental.set_loop_options(
        shape_invariants=[(problems, tf.TensorShape([None, ITEM_COLUMNS]))]
      )
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        timed_out = tf.constant(True)
        break
      transitions, versions, info, items = batch.get_value()
      bad = items[:, PROBLEM] > 0
      problems = tf.concat([problems, tf.boolean_mask(items, bad)], axis=0)
      if tf.reduce_all(bad):
        continue
      if self._replay.prioritized:
        loss_info = self.agent.train(
          transitions, weights=importance_weights(info, self.importance_exponent)
        )
        # Priorities of the sampled items become their new |TD error|. A row
        # standing in for an invalid item repeats a valid one, which has its own.
        priorities = tf.abs(tf.cast(loss_info.extra.td_error, tf.float64)) + PRIORITY_FLOOR
        valid = tf.logical_not(bad)
        self._replay.update_priorities(
          tf.boolean_mask(info.key, valid),
          tf.boolean_mask(priorities, valid),
          tf.boolean_mask(items[:, SHARD], valid),
        )
      else:
        loss_info = self.agent.train(transitions)
      loss = loss_info.loss
      keys = tf.bitcast(items[:, KEY], tf.uint64)
      shards = items[:, SHARD]
      td_errors = loss_info.extra.td_error
      done += 1
      if i == steps - 1:  # once per call, not per step: it costs a forward pass
        q_values, _ = self.q_network(transitions.time_step.observation)
        mean_q = tf.reduce_mean(tf.reduce_max(q_values, axis=-1))
    return done, timed_out, loss, mean_q, versions, keys, shards, td_errors, problems
