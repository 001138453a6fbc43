"""The agent: TF-Agents DQN (or Double DQN) on the shared Q-network."""
import tensorflow as tf
from tf_agents.agents.dqn import dqn_agent
from tf_agents.utils import common

from dqnfleet.core.settings.config import AgentConfig
from dqnfleet.core.rl.specs import EnvSpecs


def make_optimizer(config: AgentConfig) -> tf.keras.optimizers.Optimizer:
  if config.optimizer == "rmsprop":
    # The Nature-DQN flavour of RMSprop (as in TF-Agents' Atari example).
    return tf.keras.optimizers.RMSprop(config.learning_rate, rho=0.95, momentum=0.0,
                                       epsilon=0.01, centered=True)
  return tf.keras.optimizers.Adam(config.learning_rate, epsilon=config.adam_epsilon)


def importance_weights(info, exponent: float) -> tf.Tensor:
  """Prioritized replay's correction (N * P(i))^-exponent, scaled so the largest is 1."""
  weights = tf.pow(tf.cast(info.table_size, tf.float64) * info.probability, -exponent)
  return tf.cast(weights / tf.reduce_max(weights), tf.float32)


def make_agent(env_specs: EnvSpecs, q_network: tf.keras.Model, config: AgentConfig,
               train_step: tf.Variable, jit_compile: bool = False) -> dqn_agent.DqnAgent:
  """The agent trains `q_network` in place; the trainer publishes its weights."""
  agent_class = dqn_agent.DdqnAgent if config.double_dqn else dqn_agent.DqnAgent
  agent = agent_class(
      env_specs.time_step, env_specs.action,
      q_network=q_network,
      optimizer=make_optimizer(config),
      # Collectors build their own epsilon-greedy policy (core/rl/networks.py);
      # the agent's collect policy is never used.
      epsilon_greedy=0.0,
      target_update_period=config.target_update_period,
      target_update_tau=config.target_update_tau,
      td_errors_loss_fn=(common.element_wise_huber_loss if config.td_loss == "huber"
                         else common.element_wise_squared_loss),
      reward_scale_factor=config.reward_scale,
      gamma=config.gamma,
      # Items carry n transitions (core/rl/specs.py); the agent sums their
      # discounted rewards and bootstraps from the n-th next observation.
      n_step_update=env_specs.n_step,
      gradient_clipping=config.gradient_clipping or None,
      train_step_counter=train_step)
  agent.initialize()
  agent.train = common.function(agent.train, autograph=False, jit_compile=jit_compile)
  return agent
