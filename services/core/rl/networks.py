"""The Q-network and the epsilon-greedy policy on it, shared by every service.

Collectors and the evaluators build exactly the network the trainer trains, from
the same settings, and then load published weights into it.
"""

import tensorflow as tf
from tf_agents.networks import q_network
from tf_agents.policies import epsilon_greedy_policy, q_policy

from dqnfleet.core.rl.specs import EnvSpecs
from dqnfleet.core.settings.config import NetworkConfig

# Nature DQN (Mnih et al. 2015): (filters, kernel, stride).
NATURE_CONV_LAYERS = ((32, (8, 8), 4), (64, (4, 4), 2), (64, (3, 3), 1))


def q_net(specs: EnvSpecs, config: NetworkConfig) -> q_network.QNetwork:
  """Nature CNN + dense layers for pixels, dense layers for state vectors."""
  pixels = specs.stack > 1 or len(specs.observation.shape) == 3
  # Frames stay uint8 in replay and on the wire (4x smaller); scaling happens
  # inside the network.
  preprocessing = (
    tf.keras.layers.Lambda(lambda x: tf.cast(x, tf.float32) / 255.0) if pixels else None
  )
  network = q_network.QNetwork(
    specs.observation,
    specs.action,
    preprocessing_layers=preprocessing,
    conv_layer_params=NATURE_CONV_LAYERS if pixels else None,
    fc_layer_params=config.fc_layers,
  )
  network.create_variables()
  return network


def epsilon_greedy(
  specs: EnvSpecs, network: q_network.QNetwork, epsilon: tf.Variable
) -> epsilon_greedy_policy.EpsilonGreedyPolicy:
  """The collect policy; `epsilon` is read at every call, so assigning it takes effect."""
  return epsilon_greedy_policy.EpsilonGreedyPolicy(
    q_policy.QPolicy(specs.time_step, specs.action, network), epsilon=lambda: epsilon
  )
