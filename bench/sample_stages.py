"""Where the trainer's input path spends its CPU, stage by stage, on one Breakout batch.

bench/sample_throughput.py measures the whole path against real replay
servers; this times its stages alone, in this process, on synthetic items of
the Breakout layout (7 frames of 84x84 uint8 per 3-step item, batch 32), so
each can be compared with the others as a ratio within one run:

- assembling observations from an item's frames (replay_io.observation):
  all n+1 of them, as before issue #19, and only s_t and s_t+n, as now; and
  the channel interleave [k, H, W] -> [H, W, k] (TF's transpose) that
  assembling them cost while observations stacked their frames last;
- the per-item map the dataset runs on every sampled item (the shape check
  of trainer/dataset.py's `conform`), against a map that does nothing and
  against batching alone.

    .venv/bin/python bench/sample_stages.py [--batches 200]

Prints one JSON object: CPU microseconds per item of each stage.
"""

import argparse
import json
import time

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # before TensorFlow is imported

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.settings.config import EnvConfig
from dqnfleet.trainer.dataset import conform

BATCH = 32
ENV_SPECS = specs.env_specs(EnvConfig(env_id="ALE/Breakout-v5"))
STACK, N = ENV_SPECS.stack, ENV_SPECS.n_step


def cpu_us_per_item(fn, calls: int) -> float:
  fn()  # trace
  started = time.process_time()
  for _ in range(calls):
    fn()
  return round((time.process_time() - started) / calls / BATCH * 1e6, 1)


def per_item_map_us(items: int, fn) -> float:
  """CPU per item of batching `items` items after the per-item map `fn` (None: no map)."""
  rng = np.random.default_rng(0)
  info = reverb.SampleInfo(
    key=tf.constant(1, tf.uint64),
    probability=tf.constant(1.0, tf.float64),
    table_size=tf.constant(1, tf.int64),
    priority=tf.constant(1.0, tf.float64),
    times_sampled=tf.constant(1, tf.int32),
  )
  frames = rng.integers(0, 255, (STACK + N, 84, 84), dtype=np.uint8)
  data = {"frames": tf.constant(frames), "step": tf.zeros((N, len(specs.STEP_FIELDS)), tf.float64)}

  def batches(count):
    dataset = tf.data.Dataset.from_tensors(reverb.ReplaySample(info, data)).repeat(count)
    return iter((dataset if fn is None else dataset.map(fn)).batch(BATCH))

  @tf.function
  def drain(iterator):
    count = tf.constant(0)
    for _ in iterator:
      count += 1
    return count

  drain(batches(BATCH))  # traced once, for iterators of the same element spec
  iterator = batches(items)
  started = time.process_time()
  drain(iterator)
  return round((time.process_time() - started) / items * 1e6, 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=200)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  frames = tf.constant(rng.integers(0, 255, (BATCH, STACK + N, 84, 84), dtype=np.uint8))
  every = tf.function(
    lambda f: tf.stack([replay_io.observation(f, STACK, j) for j in range(N + 1)], axis=1)
  )
  ends = tf.function(
    lambda f: (replay_io.observation(f, STACK, 0), replay_io.observation(f, STACK, N))
  )
  interleave = tf.function(
    lambda f: [tf.transpose(f[:, j : j + STACK], [0, 2, 3, 1]) for j in (0, N)]
  )
  copy = tf.function(lambda f: tf.identity(f) + 0)
  signature = specs.replay_signature(ENV_SPECS)
  items = 10 * args.batches * BATCH
  print(
    json.dumps(
      {
        "benchmark": "sample_stages",
        "env_id": "ALE/Breakout-v5",
        "batch": BATCH,
        "cpu_us_per_item": {
          "observations_all_n_plus_1": cpu_us_per_item(lambda: every(frames).numpy(), args.batches),
          "observations_s_t_and_s_t_plus_n": cpu_us_per_item(
            lambda: [x.numpy() for x in ends(frames)], args.batches
          ),
          "interleave_s_t_and_s_t_plus_n_channels_last": cpu_us_per_item(
            lambda: [x.numpy() for x in interleave(frames)], args.batches
          ),
          "touch_the_frames_once": cpu_us_per_item(lambda: copy(frames).numpy(), args.batches),
          "batching_alone": per_item_map_us(items, None),
          "batching_after_an_empty_per_item_map": per_item_map_us(items, lambda s: (s, 0)),
          "batching_after_the_shape_check": per_item_map_us(items, lambda s: conform(s, signature)),
        },
      }
    )
  )


if __name__ == "__main__":
  main()
