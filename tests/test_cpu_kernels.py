"""The stacked-frames layer on either CPU kernel path, the services' choice of kernels, and
the trainer's bf16 precision.

TF 2.15 turns oneDNN on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX;
without oneDNN its own 3-D convolution gradient took 53 s per Breakout train
step on an AVX2 EPYC. The services turn oneDNN on (core/transport/runtime.py),
and without it the layer runs as a 2-D convolution.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dqnfleet.core.policy import store
from dqnfleet.core.rl import networks, specs
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig


@pytest.mark.parametrize("conv3d", [True, False])
def test_either_path_of_the_stacked_frames_layer_is_the_channels_last_convolution(conv3d):
  frames = np.random.default_rng(3).integers(0, 256, (2, 4, 84, 84), dtype=np.uint8)
  layer = networks.StackedFramesConv(*networks.NATURE_CONV_LAYERS[0], conv3d=conv3d)
  got = layer(tf.constant(frames)).numpy()
  pixels = np.moveaxis(frames, 1, -1).astype(np.float32) / 255.0
  expected = tf.nn.relu(tf.nn.conv2d(pixels, layer.kernel, 4, "VALID") + layer.bias).numpy()
  assert got.shape == expected.shape == (2, 20, 20, 32)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert layer.kernel.shape == (8, 8, 4, 32)  # Conv2D's kernel shape (and initialisation)


# What a service process sees: its kernels, and the ops of a Breakout gradient step.
PROBE = """
import json
from dqnfleet.core.transport import runtime
runtime.prepare_tensorflow()
import tensorflow as tf
from dqnfleet.core.rl import networks, specs
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig
env_specs = specs.env_specs(EnvConfig(env_id="ALE/Breakout-v5"))
q_net = networks.q_net(env_specs, NetworkConfig())
frames = tf.zeros([2, *env_specs.observation.shape], tf.uint8)
@tf.function
def gradients():
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(q_net(frames)[0])
  return tape.gradient(loss, q_net.trainable_variables)
ops = {op.type for op in gradients.get_concrete_function().graph.get_operations()}
print(json.dumps({"onednn": networks.onednn_enabled(), "conv3d": "Conv3D" in ops}))
"""


@pytest.mark.parametrize("setting, onednn", [(None, True), ("0", False), ("1", True)])
def test_services_run_onednn_unless_told_not_to_and_then_train_with_2d_convolutions(
  setting, onednn
):
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if setting is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = setting
  probe = subprocess.run(
    [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
  )
  assert probe.returncode == 0, probe.stderr[-3000:]
  seen = json.loads(probe.stdout.strip().splitlines()[-1])
  # TF's own 3-D convolution gradient is the one that takes a minute a step.
  assert seen == {"onednn": onednn, "conv3d": onednn}


def test_a_precision_is_resolved_or_refused_with_what_is_allowed():
  atari = specs.env_specs(EnvConfig(env_id="ALE/Breakout-v5"))
  cartpole = specs.env_specs(EnvConfig(env_id="CartPole-v1"))
  for given in ("fp32", "bf16"):
    assert networks.resolve_precision(given, atari) == given
    assert networks.resolve_precision(given, cartpole) == given
  native = networks.bf16_native()
  assert networks.resolve_precision("auto", atari) == ("bf16" if native else "fp32")
  assert networks.resolve_precision("auto", cartpole) == "fp32"  # dense layers gain nothing
  with pytest.raises(ValueError, match="'fp16' is not one of auto, fp32, bf16"):
    networks.resolve_precision("fp16", atari)


def test_a_bf16_network_publishes_float32_weights_that_give_its_q_values_in_fp32(tmp_path):
  env = EnvConfig(env_id="ALE/Breakout-v5")
  env_specs, net = specs.env_specs(env), NetworkConfig()
  bf16 = networks.q_net(env_specs, net, "bf16")
  assert {v.dtype for v in bf16.variables} == {tf.float32}
  frames = np.random.default_rng(5).integers(0, 256, (8, *env_specs.observation.shape), np.uint8)
  q_bf16 = bf16(tf.constant(frames))[0]
  assert q_bf16.dtype == tf.float32  # what the agent's TD targets are computed in
  store.publish(tmp_path, 7, bf16, env, net, keep=1)
  fp32 = networks.q_net(env_specs, net, "fp32")
  store.restore_weights(fp32, store.version_dir(tmp_path, 7))
  for loaded, published in zip(fp32.get_weights(), bf16.get_weights()):
    np.testing.assert_array_equal(loaded, published)
  q_fp32 = fp32(tf.constant(frames))[0].numpy()
  # bf16 keeps 8 bits of mantissa: the same Q-values to within a few per cent.
  scale = np.abs(q_fp32).max()
  np.testing.assert_allclose(q_bf16.numpy(), q_fp32, atol=0.05 * scale)
  assert not np.array_equal(q_bf16.numpy(), q_fp32)  # bf16 really computed them
