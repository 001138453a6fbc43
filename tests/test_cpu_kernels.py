"""The stacked-frames layer on either CPU kernel path, and the services' choice of kernels.

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

from dqnfleet.core.rl import networks


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
