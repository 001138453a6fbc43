"""The trainer's batches are, item for item, what the replay layout specifies: 1 and 2 shards.

Rows with known values are written through the collectors' own writer
(replay_io.RowWriter) to real Reverb servers on loopback ports, and every
item of the trainer's batches (trainer/dataset.py) is checked against those
rows: s_t and s_t+n stacked from the right frames, a_t, the n-step reward
and discount of the agent's target, the policy version, and the shard that
holds it. The targets are TF-Agents' own: to_n_step_transition of the
[n+1]-step trajectory the rows describe, which is what DqnAgent trained on
before the dataset built n-step transitions itself. The same, with the
batches built by a `dqnfleet input-worker` process (tf.data service).
"""

import numpy as np
import pytest
import reverb
import tensorflow as tf
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory

from dqnfleet.core.rl import replay_io, specs
from dqnfleet.trainer.dataset import KEY, PROBLEM, SHARD, make_sharded_dataset
from dqnfleet.trainer.input_service import Dispatcher
from support import free_port, replay_table, service_args, tiny_specs, wait_until

GAMMA = 0.9
FRAMES, STATES = tiny_specs("frames"), tiny_specs("states")
ROWS = 40
SHARD_BASE = 100  # shard s's row r holds the values SHARD_BASE * s + r


def value(shard: int, r: int) -> int:
  return SHARD_BASE * shard + r


def discount(r: int) -> float:
  return (1.0, 0.75, 0.5)[r % 3]  # exact in float32; products that differ per item


def write(client, env_specs, shard: int, frame_chunk_rows: int) -> None:
  """Row r: frame, reward and version from value(shard, r), action r mod |A|; an item per row
  from the (k+n)-th on, as a collector writes them."""
  layout = replay_io.ItemLayout(env_specs.stack, env_specs.n_step, frame_chunk_rows)
  writer = replay_io.RowWriter(client, layout)
  for r in range(ROWS):
    v = value(shard, r)
    frame = np.full(env_specs.frame.shape, v, env_specs.frame.dtype)
    writer.append(**specs.row(frame, r % env_specs.num_actions, float(v), discount(r), v, 7))
    if r >= layout.frame_rows - 1:
      writer.create_item()
  writer.end_episode(timeout_ms=10_000)
  writer.close()


def expected_item(env_specs, shard: int, last: int) -> trajectory.Transition:
  """TF-Agents' n-step transition of the item whose newest row is `last`, from the rows."""
  k, n = env_specs.stack, env_specs.n_step
  first = last - n + 1  # the row of a_t, whose frame is s_t+1's newest

  def obs(j):  # s_t+j: the frames of rows first-k+j ... first-1+j, stacked first
    frames = [np.full(env_specs.frame.shape, value(shard, first - k + j + i)) for i in range(k)]
    return frames[0] if k == 1 else np.stack(frames)

  steps = range(first, last + 1)
  mid = np.full([1, n + 1], ts.StepType.MID, np.int32)
  experience = trajectory.Trajectory(
    step_type=mid,
    observation=np.stack([obs(j) for j in range(n + 1)])[None].astype(env_specs.frame.dtype),
    action=np.array([[r % env_specs.num_actions for r in steps] + [0]], np.int64),
    policy_info=(),
    next_step_type=mid,
    reward=np.array([[value(shard, r) for r in steps] + [0]], np.float32),
    discount=np.array([[discount(r) for r in steps] + [1]], np.float32),
  )
  return trajectory.to_n_step_transition(tf.nest.map_structure(tf.constant, experience), GAMMA)


@pytest.fixture
def input_worker(services):
  """A dispatcher in this process, as in the trainer, and a real `dqnfleet input-worker`."""
  dispatcher = Dispatcher(0)
  services(
    "input-worker",
    *service_args(
      "input-worker",
      dispatcher_address=f"localhost:{dispatcher.port}",
      port=free_port(),
      status_port=free_port(),
      metrics_port=-1,
    ),
  )
  wait_until(lambda: dispatcher.workers() == 1, 120, "the input worker to register")
  yield dispatcher.target  # the dispatcher lives as long as this reference


@pytest.mark.parametrize(
  "env_specs, shards, frame_chunk_rows, service",
  [
    (FRAMES, 1, replay_io.FRAME_CHUNK_ROWS, False),
    (FRAMES, 2, replay_io.FRAME_CHUNK_ROWS, False),
    (FRAMES, 1, 5, False),  # items straddle chunks of a length that divides nothing
    (STATES, 2, replay_io.FRAME_CHUNK_ROWS, False),
    # Batches built by an input worker (tf.data service), mixed batch by batch.
    (FRAMES, 1, replay_io.FRAME_CHUNK_ROWS, True),
    (FRAMES, 2, replay_io.FRAME_CHUNK_ROWS, True),
  ],
  ids=[
    "frames-1-shard",
    "frames-2-shards",
    "frames-chunks-of-5",
    "states-2-shards",
    "frames-1-shard-input-worker",
    "frames-2-shards-input-worker",
  ],
)
def test_every_sampled_item_is_the_n_step_transition_of_its_rows(
  env_specs, shards, frame_chunk_rows, service, request
):
  input_service = request.getfixturevalue("input_worker") if service else ""
  servers = [reverb.Server([replay_table(env_specs)], port=free_port()) for _ in range(shards)]
  try:
    addresses = [f"localhost:{server.port}" for server in servers]
    for shard, address in enumerate(addresses):
      write(reverb.Client(address), env_specs, shard, frame_chunk_rows)
      items = reverb.Client(address).server_info()[specs.TABLE].current_size
      assert items == ROWS - env_specs.stack - env_specs.n_step + 1
    weights = tf.Variable(tf.ones([shards], tf.float64), trainable=False)
    batch, seen = 16, set()
    dataset = make_sharded_dataset(
      dict(enumerate(addresses)), weights, env_specs, batch, 1, GAMMA, input_service=input_service
    )
    # Mixed batch by batch, 2 shards leave one unsampled in 20 batches with probability 2^-19.
    for transitions, versions, info, rows in dataset.take(20 if service else 6):
      assert not rows.numpy()[:, PROBLEM].any()  # the writer's items pass the trainer's checks
      np.testing.assert_array_equal(tf.bitcast(rows[:, KEY], tf.uint64).numpy(), info.key.numpy())
      for b in range(batch):
        shard = int(rows[b, SHARD])
        newest = transitions.next_time_step.observation[b].numpy().flat[-1]  # frame of row last
        last = int(newest) - SHARD_BASE * shard
        what = f"the item of shard {shard}, row {last}"
        first, action, final = expected_item(env_specs, shard, last)
        got = tf.nest.map_structure(lambda x, b=b: x[b : b + 1], transitions)
        np.testing.assert_array_equal(got.time_step.observation, first.observation, what)
        np.testing.assert_array_equal(got.action_step.action, action.action, what)
        np.testing.assert_array_equal(got.next_time_step.observation, final.observation, what)
        np.testing.assert_allclose(got.next_time_step.reward, final.reward, 1e-6, 0, what)
        np.testing.assert_allclose(got.next_time_step.discount, final.discount, 1e-6, 0, what)
        np.testing.assert_array_equal(got.time_step.step_type, first.step_type, what)
        assert int(versions[b]) == value(shard, last - env_specs.n_step + 1), what
        seen.add(shard)
    assert seen == set(range(shards)), "every shard is sampled"
  finally:
    for server in servers:
      server.stop()
