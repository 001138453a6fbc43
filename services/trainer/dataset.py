"""Replay -> agent: batches of transitions sampled from Reverb over gRPC.

Items come in the replay layout of core/rl/specs.py (frames stored once),
are decoded by core/rl/replay_io.py, and leave as the n-step `Transition`
that TF-Agents' DqnAgent trains on, with a row per item saying
where it came from and what is wrong with it. Several replay servers (shards)
are mixed item by item before batching. trainer/replay_source.py owns the
dataset built here.
"""

from collections.abc import Mapping

import reverb
import tensorflow as tf
from tf_agents.trajectories import policy_step, trajectory
from tf_agents.trajectories import time_step as ts
from tf_agents.utils import value_ops

from dqnfleet.core.rl import replay_io, specs

# After this long without a sample, the dataset ends so the trainer can say
# why (table below its minimum, or the rate limiter waiting for collectors).
SAMPLE_TIMEOUT_MS = 5_000
# Each item's row of the dataset's `items` [B, ITEM_COLUMNS] int64: its key's
# bits, a PROBLEMS code (0: valid), the index of the shard that holds it.
KEY, PROBLEM, SHARD = 0, 1, 2
ITEM_COLUMNS = 3
# Shard choices drawn per read of the weights. One categorical draw per item,
# what Dataset.sample_from_datasets does, cost 115 us an item mixing three
# trivial datasets on the 2-core machine, against 3 us drawn in blocks;
# receiving and decoding a sampled item costs 170-204 us (docs/replay.md).
# The weights move every few seconds, so a block drawn from older ones does
# not matter.
CHOICES_PER_READ = 128

WRONG_SHAPE = 5
PROBLEMS = {
  1: "a step value is not finite",
  2: "a discount is outside [0, 1]",
  3: "an action is not one of the environment's",
  4: "an observation is not finite",
  WRONG_SHAPE: "its shapes are not the table signature's",
}


def to_transition(sample: reverb.ReplaySample, stack: int, gamma: float):
  """A batch of n-step replay items -> (n-step Transition [B], policy versions [B], info).

  The Transition is what DqnAgent(n_step_update=n) makes of a [B, n+1]
  Trajectory (trajectory.to_n_step_transition, the same arithmetic): s_t and
  a_t, s_t+n, the discounted sum of the n rewards and the product of their
  discounts times gamma^(n-1); the agent multiplies in the last gamma. Built
  here, in the dataset's threads, the n-1 observations between s_t and s_t+n
  are never assembled (replay_io.decode).
  """
  items = replay_io.decode(sample.data, stack)
  reward, discount = items.step["reward"], items.step["discount"]  # [B, n]
  n = reward.shape[1]
  mid = tf.fill(tf.shape(reward)[:1], ts.StepType.MID)
  unknown = tf.fill(tf.shape(reward)[:1], float("nan"))  # as to_n_step_transition leaves them
  transition = trajectory.Transition(
    time_step=ts.TimeStep(mid, unknown, unknown, items.first),
    action_step=policy_step.PolicyStep(items.step["action"][:, 0], (), ()),
    next_time_step=ts.TimeStep(
      mid,
      value_ops.discounted_return(
        reward, gamma * discount, time_major=False, provide_all_returns=False
      ),
      gamma ** (n - 1) * tf.reduce_prod(discount, axis=1),
      items.last,
    ),
  )
  return transition, items.step["policy_version"][:, 0], sample.info


def conform(sample: reverb.ReplaySample, signature) -> tuple[reverb.ReplaySample, tf.Tensor]:
  """(One item with the signature's static shapes, 0 or WRONG_SHAPE).

  Reverb 0.14's server stores any item a client writes (it keeps the table
  signature for clients to read, and checks nothing against it), and its
  sampler fails the whole dataset on an item of another shape, without
  saying which. Sampled with any shape and checked here, where the item's
  key is known, such an item becomes zeros of the right shape and is
  reported with the rest.
  """

  def fits(x, shape):
    # Without a cond (each costs the per-item map as much as the rest of it,
    # bench/sample_throughput.py): x's dims + 1, then zeros, cut at rank + 1,
    # equal the expected dims + 1 and a zero only if rank and dims agree.
    got = tf.concat([tf.shape(x) + 1, tf.zeros([shape.rank + 1], tf.int32)], 0)
    return tf.reduce_all(tf.equal(got[: shape.rank + 1], [d + 1 for d in shape.as_list()] + [0]))

  ok = tf.reduce_all([fits(sample.data[name], spec.shape) for name, spec in signature.items()])
  data = tf.cond(
    ok,
    lambda: {name: tf.reshape(sample.data[name], s.shape) for name, s in signature.items()},
    lambda: {name: tf.zeros(s.shape, s.dtype) for name, s in signature.items()},
  )
  return sample._replace(data=data), tf.where(ok, 0, WRONG_SHAPE)


def item_problems(sample: reverb.ReplaySample, env_specs: specs.EnvSpecs) -> tf.Tensor:
  """Per item of a batch, 0 if its values are ones a collector writes, else what is wrong.

  Collectors write what the table's signature describes (their writers check
  it). Any Reverb client can still write a NaN reward or an action the
  network has no output for, and one such item would crash every train
  step that samples it.
  """
  step = sample.data["step"]  # [B, n, len(specs.STEP_FIELDS)]
  every = lambda x: tf.reduce_all(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
  action, discount = step[..., 0], step[..., 2]
  checks = [
    every(tf.math.is_finite(step)),
    every((discount >= 0) & (discount <= 1)),
    every((action >= 0) & (action < env_specs.num_actions) & (action == tf.floor(action))),
  ]
  frames = sample.data["frames"]
  if frames.dtype.is_floating:  # state vectors; uint8 frames cannot be out of range
    checks.append(every(tf.math.is_finite(frames)))
  codes = [tf.where(ok, 0, i + 1) for i, ok in enumerate(checks)]
  return tf.reduce_max(tf.stack(codes), axis=0)


def without_bad_items(
  sample: reverb.ReplaySample, shape_codes: tf.Tensor, shards: tf.Tensor, env_specs: specs.EnvSpecs
) -> tuple[reverb.ReplaySample, tf.Tensor]:
  """(The batch with each invalid item replaced by a valid one, its [B] item rows).

  A row is (key, problem, shard) of the item sampled there (KEY, PROBLEM,
  SHARD), so the trainer deletes what it saw from the shard that holds it,
  without a Python callback inside tf.data. A replaced row still names the
  invalid item; its data (and info) are the valid one's. A batch with no
  valid item at all is all problems; the trainer does not train on it.
  """
  codes = tf.where(shape_codes > 0, shape_codes, item_problems(sample, env_specs))
  bad = codes > 0
  first_valid = tf.argmin(tf.cast(bad, tf.int32), output_type=tf.int32)
  rows = tf.where(bad, first_valid, tf.range(tf.shape(bad)[0]))
  replaced = tf.cond(
    tf.reduce_any(bad),
    lambda: tf.nest.map_structure(lambda x: tf.gather(x, rows), sample),
    lambda: sample,
  )
  # Keys are uint64, the problems int64 to sit beside them: the bits travel
  # unchanged and the trainer reads them back as uint64.
  return replaced, tf.stack(
    [tf.bitcast(sample.info.key, tf.int64), tf.cast(codes, tf.int64), tf.cast(shards, tf.int64)],
    axis=1,
  )


def shard_items(
  address: str, signature, batch_size: int, shard: int, workers: int
) -> tf.data.Dataset:
  """One server's items, one at a time: (sample, shape code, shard); see conform."""
  dataset = reverb.TrajectoryDataset(
    server_address=address,
    table=specs.TABLE,
    dtypes=tf.nest.map_structure(lambda s: s.dtype, signature),
    shapes=tf.nest.map_structure(lambda s: tf.TensorShape(None), signature),
    max_in_flight_samples_per_worker=2 * batch_size,
    num_workers_per_iterator=workers,
    rate_limiter_timeout_ms=SAMPLE_TIMEOUT_MS,
  )
  return dataset.map(lambda sample: (*conform(sample, signature), tf.constant(shard, tf.int32)))


def mix(items: list[tf.data.Dataset], shards: list[int], weights: tf.Variable) -> tf.data.Dataset:
  """Items of several shards, each drawn from shard i with probability ~ weights[shards[i]].

  `weights` is read as the dataset runs, so a trainer that refreshes it
  moves the mix without a new iterator. All zero (no shard can be sampled
  yet) draws equally, so that sampling waits and the trainer says why.
  One shard that times out ends the whole dataset, as one server does.
  """
  if len(items) == 1:
    return items[0]
  mixed = tf.constant(shards, tf.int64)

  def choices(_):
    w = tf.gather(weights, mixed)
    w = tf.where(tf.reduce_sum(w) > 0, w, tf.ones_like(w))
    return tf.random.categorical(tf.math.log(w)[None], CHOICES_PER_READ)[0]

  chosen = tf.data.Dataset.from_tensors(0).repeat().map(choices).unbatch()
  return tf.data.Dataset.choose_from_datasets(items, chosen, stop_on_empty_dataset=True)


def make_sharded_dataset(
  addresses: Mapping[int, str],
  weights: tf.Variable | None,
  env_specs: specs.EnvSpecs,
  batch_size: int,
  prefetch_batches: int,
  gamma: float,
  workers_per_shard: int = 1,
  input_service: str = "",
) -> tf.data.Dataset:
  """(n-step transitions, policy versions, info, items) per batch, mixed from the shards
  `addresses` ({shard index: host:port}) by `weights` (see mix; unused for one shard).
  `workers_per_shard`: Reverb sampling workers (a gRPC stream and the thread that
  decompresses what it receives) per shard.

  `input_service` (a tf.data service dispatcher, grpc://host:port; see
  trainer/input_service.py): its workers build each shard's batches and the
  shards are mixed batch by batch here, by the same weights. Workers run a
  serialized copy of the pipeline and cannot read this process's `weights`;
  a batch from one shard has the same expectation as one mixed item by item.
  """
  signature = specs.replay_signature(env_specs)
  items = [
    shard_items(a, signature, batch_size, i, workers_per_shard) for i, a in addresses.items()
  ]

  def to_batch(sample, shape_codes, shards):
    sample, rows = without_bad_items(sample, shape_codes, shards, env_specs)
    return (*to_transition(sample, env_specs.stack, gamma), rows)

  def batches(items: tf.data.Dataset) -> tf.data.Dataset:
    return items.batch(batch_size, drop_remainder=True).map(
      to_batch, num_parallel_calls=tf.data.AUTOTUNE
    )

  if not input_service:
    return batches(mix(items, list(addresses), weights)).prefetch(prefetch_batches)
  remote = [
    # Uncompressed: compressing costs workers and trainer more CPU than it saves on a LAN.
    batches(one).apply(
      tf.data.experimental.service.distribute("parallel_epochs", input_service, compression=None)
    )
    for one in items
  ]
  return mix(remote, list(addresses), weights).prefetch(prefetch_batches)


def make_dataset(
  replay_address: str,
  env_specs: specs.EnvSpecs,
  batch_size: int,
  prefetch_batches: int,
  gamma: float,
  **options,
) -> tf.data.Dataset:
  """One server's batches (its items are shard 0); see make_sharded_dataset."""
  return make_sharded_dataset(
    {0: replay_address}, None, env_specs, batch_size, prefetch_batches, gamma, **options
  )
