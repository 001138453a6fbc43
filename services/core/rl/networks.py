"""The Q-network and the epsilon-greedy policies on it, shared by every service.

Collectors and the evaluators build exactly the network the trainer trains, from
the same settings, and then load published weights into it.
"""

import numpy as np
import tensorflow as tf
from tf_agents.networks import q_network
from tf_agents.policies import epsilon_greedy_policy, q_policy
from tf_agents.trajectories import policy_step
from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl.specs import EnvSpecs
from dqnfleet.core.settings.config import PRECISIONS, NetworkConfig

# Nature DQN (Mnih et al. 2015): (filters, kernel, stride).
NATURE_CONV_LAYERS = ((32, (8, 8), 4), (64, (4, 4), 2), (64, (3, 3), 1))


def onednn_enabled() -> bool:
  """Whether TensorFlow runs its CPU kernels through oneDNN (core/transport/runtime.py)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # TF's own probe; private

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return False


def cpu_has_bf16() -> bool:
  """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), per /proc/cpuinfo."""
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      flags = set(cpuinfo.read().split())
  except OSError:
    return False
  return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_native() -> bool:
  """Whether bf16 runs natively here: the CPU's instructions, through oneDNN's kernels."""
  return onednn_enabled() and cpu_has_bf16()


def sees_pixels(specs: EnvSpecs) -> bool:
  """Whether the network for these specs is the Nature CNN (Atari) rather than dense layers."""
  return specs.stack > 1 or len(specs.observation.shape) == 3


def resolve_precision(precision: str, specs: EnvSpecs) -> str:
  """`auto` is bf16 where it pays and fp32 elsewhere; an explicit choice is kept.

  On a 2-core EPYC with avx512_bf16 the Nature CNN's train step ran 1.34-1.43x
  faster under bf16; on one without it, where TensorFlow emulates bf16, 6x
  slower (docs/performance.md). Both need oneDNN's kernels. A network of a
  few dense layers (CartPole's) has too little arithmetic to gain and would
  only lose precision, so `auto` keeps it in fp32.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
  if precision != "auto":
    return precision
  return "bf16" if sees_pixels(specs) and bf16_native() else "fp32"


class StackedFramesConv(tf.keras.layers.Layer):
  """A 2-D convolution whose input channels are k stacked uint8 frames, [B, k, H, W].

  Observations keep their frames stacked first, as ALE renders them and as
  replay stores them, one plane per frame: interleaving the planes into
  channels-last pixels ([H, W, k]) cost the trainer's input path 60-80 us of
  CPU per observation, the largest part of it (bench/sample_stages.py).
  The convolution reads the planes as they are instead: a 3-D convolution
  whose kernel spans all k frames is exactly the 2-D convolution over k
  channels (same kernel, same FLOPs), and on this CPU it trains no slower
  than the NHWC convolution, where an in-network transpose or an NCHW
  Conv2D would. The kernel keeps Conv2D's shape and initialisation.
  Frames stay uint8 in replay and on the wire (4x smaller); the scaling to
  [0, 1] happens here.

  That holds with oneDNN's kernels only: TensorFlow's own 3-D convolution
  gradient took 53 s per train step on an AVX2 CPU. Without oneDNN (a user's
  TF_ENABLE_ONEDNN_OPTS=0, a build without it) the layer transposes the
  frames to channels last and runs the 2-D convolution instead: the same
  kernel and the same result, at the Conv2D network's speed.
  """

  def __init__(self, filters: int, kernel_size, stride: int, conv3d: bool | None = None, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.stride = filters, tuple(kernel_size), stride
    # Which kernels compute it is this process's choice, not the model's:
    # not in get_config, so weights move freely between hosts.
    self.conv3d = onednn_enabled() if conv3d is None else conv3d

  def build(self, input_shape):
    stack = int(input_shape[-3])
    self.kernel = self.add_weight(
      "kernel", (*self.kernel_size, stack, self.filters), initializer="glorot_uniform"
    )
    self.bias = self.add_weight("bias", (self.filters,), initializer="zeros")

  def call(self, frames):
    if not self.conv3d:
      pixels = tf.cast(tf.transpose(frames, [0, 2, 3, 1]), self.compute_dtype) / 255.0  # [B,H,W,k]
      return tf.nn.relu(tf.nn.conv2d(pixels, self.kernel, self.stride, "VALID") + self.bias)
    planes = tf.cast(frames, self.compute_dtype)[..., None] / 255.0  # [B, k, H, W, 1]
    kernel = tf.transpose(self.kernel, [2, 0, 1, 3])[..., None, :]  # [k, kh, kw, 1, filters]
    out = tf.nn.conv3d(planes, kernel, [1, 1, self.stride, self.stride, 1], "VALID")
    return tf.nn.relu(tf.squeeze(out, 1) + self.bias)  # [B, H', W', filters]

  def get_config(self):
    return super().get_config() | {
      "filters": self.filters,
      "kernel_size": self.kernel_size,
      "stride": self.stride,
    }


class QNetwork(q_network.QNetwork):
  """TF-Agents' QNetwork, whose encoder may compute in bfloat16 (`dtype="mixed_bfloat16"`).

  Weights stay float32 either way, so a network trained in bf16 publishes
  and checkpoints exactly what an fp32 one does. The Q-value head computes
  in float32 always: the agent's TD targets and losses are float32, and a
  bf16 Q-value (8 bits of mantissa) would blur TD errors of a few hundredths.
  """

  def __init__(
    self,
    input_tensor_spec,
    action_spec,
    preprocessing_layers=None,
    conv_layer_params=None,
    fc_layer_params=None,
    dtype="float32",
    name="QNetwork",
  ):
    super().__init__(
      input_tensor_spec,
      action_spec,
      preprocessing_layers=preprocessing_layers,
      conv_layer_params=conv_layer_params,
      fc_layer_params=fc_layer_params,
      dtype=tf.keras.mixed_precision.Policy(dtype),
      name=name,
    )
    # TF-Agents builds the head with the encoder's dtype; this one is float32.
    head = self._q_value_layer
    self._q_value_layer = tf.keras.layers.Dense(
      head.units,
      kernel_initializer=head.kernel_initializer,
      bias_initializer=head.bias_initializer,
      dtype="float32",
    )


def q_net(specs: EnvSpecs, config: NetworkConfig, precision: str = "fp32") -> QNetwork:
  """Nature CNN + dense layers for pixels, dense layers for state vectors.

  `precision` is "fp32" or "bf16" (resolve_precision): how this process
  computes, not part of the model.
  """
  dtype = {"fp32": "float32", "bf16": "mixed_bfloat16"}[precision]
  pixels = sees_pixels(specs)
  network = QNetwork(
    specs.observation,
    specs.action,
    preprocessing_layers=StackedFramesConv(*NATURE_CONV_LAYERS[0], dtype=dtype) if pixels else None,
    conv_layer_params=NATURE_CONV_LAYERS[1:] if pixels else None,
    fc_layer_params=config.fc_layers,
    dtype=dtype,
  )
  network.create_variables()
  return network


def epsilon_greedy(
  specs: EnvSpecs, network: QNetwork, epsilon: tf.Variable
) -> epsilon_greedy_policy.EpsilonGreedyPolicy:
  """The collect policy; `epsilon` is read at every call, so assigning it takes effect."""
  return epsilon_greedy_policy.EpsilonGreedyPolicy(
    q_policy.QPolicy(specs.time_step, specs.action, network), epsilon=lambda: epsilon
  )


class CollectPolicy:
  """The collectors' epsilon-greedy policy: one epsilon per environment, and the Q-values.

  TF-Agents' EpsilonGreedyPolicy takes one epsilon for the batch and keeps
  the Q-values to itself. Per-environment epsilons are what an exploration
  ladder needs (collector/exploration.py), and the Q-values of the states it
  acts in give the actor-side priorities (core/rl/priorities.py) without a
  second forward pass. `action(time_step, epsilons)` returns a PolicyStep
  whose info is the [E, A] Q-values of time_step's observations.
  """

  def __init__(self, specs: EnvSpecs, network: QNetwork):
    self._network, self._num_actions = network, specs.num_actions
    self._dtype = tf.as_dtype(specs.action.dtype)
    self._act = tf.function(self._actions)

  def _actions(self, observation, epsilons):
    q_values, _ = self._network(observation, training=False)
    greedy = tf.argmax(q_values, axis=-1, output_type=self._dtype)
    shape = tf.shape(greedy)
    random = tf.random.uniform(shape, 0, self._num_actions, dtype=self._dtype)
    explore = tf.random.uniform(shape) < epsilons
    return tf.where(explore, random, greedy), q_values

  def action(self, time_step: ts.TimeStep, epsilons: np.ndarray) -> policy_step.PolicyStep:
    actions, q_values = self._act(time_step.observation, tf.constant(epsilons, tf.float32))
    return policy_step.PolicyStep(actions.numpy(), (), q_values.numpy())
