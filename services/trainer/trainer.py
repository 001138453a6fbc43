"""The trainer service: replay -> agent -> published policy.

Samples batches from Reverb, trains the DQN agent, checkpoints it (and resumes
from the newest checkpoint on restart), and publishes the policy every
`publish_every` train steps as version = train step.
"""
import faulthandler
import logging
import math
import os
import threading
import time

import numpy as np
import reverb
import tensorflow as tf

from dqnfleet.core.rl import networks, specs
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.core.api import fleet_pb2_grpc
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import Report, StatusServicer, TrainerCounters
from dqnfleet.core.transport.summaries import SummaryWriter
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, TrainerConfig
from dqnfleet.trainer.dataset import PROBLEMS, make_dataset
from dqnfleet.trainer.learner import importance_weights, make_agent
from dqnfleet.core.policy.server import PolicyPublisher

log = logging.getLogger(__name__)
# Train steps per call into TensorFlow: one graph runs several steps, which
# gives about 1.5x the steps/s of small networks (see docs/performance.md).
STEPS_PER_CALL = 10
# Keeps every item sampleable under prioritized replay.
PRIORITY_FLOOR = 1e-3
SHUTDOWN_TIMEOUT_S = 25  # under up's and Kubernetes' 30 s grace
UNREADABLE_LOG_EVERY_S = 60

TRAIN_STEPS = metrics.counter("trainer_train_steps", "Gradient steps taken (since this process "
                                                     "started; the version counts all).")
LOSS = metrics.gauge("trainer_loss", "TD loss of the newest train step.")
MEAN_Q = metrics.gauge("trainer_mean_q", "Mean over a sampled batch of the greedy action's "
                                         "Q-value (grows with what the agent expects to score).")
BAD_ITEMS = metrics.counter("trainer_bad_items_dropped",
                            "Replay items with invalid values or shapes, left out of training "
                            "and deleted from the table.")
UNREADABLE_ITEMS = metrics.counter(
    "trainer_unreadable_items_skipped",
    "Replay items of another dtype or column count, skipped (Reverb does not say which item, "
    "so FIFO removes them).")
POLICY_LAG = metrics.gauge("trainer_policy_lag_steps",
                           "Train steps between the newest policy and the policy that collected "
                           "the sampled transitions (mean over a batch).")


class Trainer:
  def __init__(self, env: EnvConfig, net: NetworkConfig, agent_config: AgentConfig,
               config: TrainerConfig, stop: threading.Event):
    self.env, self.config, self._stop = env, config, stop
    self.specs = specs.env_specs(env)
    self.train_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step")
    self.q_network = networks.q_net(self.specs, net)
    self.agent = make_agent(self.specs, self.q_network, agent_config, self.train_step)
    self.batch_size = agent_config.batch_size
    self.importance_exponent = agent_config.importance_exponent
    self.prioritized = False  # read from the replay table's sampler in run()
    self.checkpoint = tf.train.Checkpoint(agent=self.agent, train_step=self.train_step)
    self.checkpoints = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(config.run_dir, "checkpoints"), max_to_keep=3)
    self._resume()
    self.publisher = PolicyPublisher(os.path.join(config.run_dir, "policies"), env, net,
                                     config.keep_policies)
    self.summaries = tf.summary.create_file_writer(
        os.path.join(config.run_dir, "tensorboard", "trainer"))
    self.steps_per_call = min(STEPS_PER_CALL, config.publish_every, config.checkpoint_every)
    self._train = tf.function(self._train_steps)
    self.replay = reverb.Client(config.replay_address)
    self.replay_size = -1
    self.fleet_env_steps = 0  # agent steps all collectors wrote (replay's insert count)
    self.last_loss = float("nan")
    self.steps_per_s = 0.0
    self.policy_lag = 0.0
    self.mean_q = float("nan")
    self.bad_items_dropped = 0
    self.unreadable_items_skipped = 0
    self._unreadable_logged = -math.inf

  def _resume(self) -> None:
    """Restores the newest intact checkpoint; a damaged one is named and skipped."""
    damaged = []
    for path in reversed(self.checkpoints.checkpoints):
      try:
        self.checkpoint.restore(path).assert_existing_objects_matched()
      except Exception as e:  # damaged files fail in TF's reader in many ways
        reason = (getattr(e, "message", None) or str(e)).splitlines()[0][:200]
        log.error("checkpoint %s is unreadable (%s); trying an older one", path, reason)
        damaged.append(path)
        continue
      log.info("resumed from %s at train step %d", path, self.step)
      return
    if damaged:  # starting over would silently throw the run away
      raise SystemExit(f"no intact training checkpoint in {self.checkpoints.directory} "
                       f"(unreadable: {', '.join(damaged)}); move them away to start over")

  @property
  def step(self) -> int:
    return int(self.train_step.numpy())

  def snapshot(self) -> Report:
    return Report(
        TrainerCounters(train_steps=self.step, loss=self.last_loss,
                        train_steps_per_s=self.steps_per_s,
                        published_version=self.publisher.latest_version,
                        policy_lag_steps=self.policy_lag, mean_q=self.mean_q,
                        fleet_env_steps=self.fleet_env_steps,
                        bad_items_dropped=self.bad_items_dropped,
                        unreadable_items_skipped=self.unreadable_items_skipped),
        policy_version=self.publisher.latest_version, replay_size=self.replay_size)

  def _replay_info(self):
    info = self.replay.server_info(timeout=5)
    if specs.TABLE not in info:
      raise RuntimeError(f"replay server at {self.config.replay_address} has no table "
                         f"{specs.TABLE!r}")
    table = info[specs.TABLE]
    self.replay_size = table.current_size
    self.fleet_env_steps = table.rate_limiter_info.insert_stats.completed
    return table

  def _check_signature(self) -> None:
    """Refuses to train on a replay server built for another environment."""
    table = rpc.retry(self._replay_info, f"connecting to replay at {self.config.replay_address}",
                      self._stop)
    if table is None:
      return
    mismatch = specs.signature_mismatch(table.signature, self.specs)
    if mismatch:
      raise SystemExit(f"the replay table does not match this trainer's environment "
                       f"{self.env.env_id} ({mismatch}); start both with the same --env-id, "
                       "--frame-stack and --n-step")
    self.prioritized = table.sampler_options.HasField("prioritized")
    if self.prioritized:
      self.tf_replay = reverb.TFClient(self.config.replay_address)
      log.info("replay samples by priority: importance exponent %.2f, priorities = |TD error|",
               self.importance_exponent)

  def _explain_wait(self) -> None:
    """Says why no batch came (called after a sampling timeout)."""
    try:
      table = self._replay_info()
    except Exception as e:  # replay down: say so, the caller retries
      log.warning("replay at %s unreachable (%s); retrying", self.config.replay_address,
                  str(e).splitlines()[0][:200])
      return
    needed = table.rate_limiter_info.min_size_to_sample
    if table.current_size < needed:
      log.info("waiting for data: replay holds %d of the %d transitions needed before training",
               table.current_size, needed)
    else:
      log.info("waiting for data: the rate limiter holds sampling until collectors insert more "
               "(replay holds %d)", table.current_size)

  def _train_steps(self, iterator, steps):
    """Up to `steps` train steps in one TensorFlow graph; returns how many ran.

    `timed_out`: sampling waited too long (no data, or the rate limiter
    waits for collectors). A batch of invalid items only is not trained on;
    `problems` lists the (key, problem) of every invalid item seen. An empty
    optional, unlike an exception, leaves no half-run step behind: the train
    step counter moves only with real steps.
    """
    done = tf.constant(0)
    loss = tf.constant(0.0)
    mean_q = tf.constant(0.0)
    versions = tf.zeros([self.batch_size], tf.int64)
    problems = tf.zeros([0, 2], tf.int64)  # (key, problem) of the invalid items left out
    timed_out = tf.constant(False)
    for i in tf.range(steps):
      tf.autograph.experimental.set_loop_options(
          shape_invariants=[(problems, tf.TensorShape([None, 2]))])
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        timed_out = tf.constant(True)
        break
      experience, versions, info, found = batch.get_value()
      bad = found[:, 1] > 0
      problems = tf.concat([problems, tf.boolean_mask(found, bad)], axis=0)
      if tf.reduce_all(bad):
        continue
      if self.prioritized:
        loss_info = self.agent.train(experience,
                                     weights=importance_weights(info, self.importance_exponent))
        # Priorities of the sampled items become their new |TD error|.
        priorities = tf.abs(tf.cast(loss_info.extra.td_error, tf.float64)) + PRIORITY_FLOOR
        self.tf_replay.update_priorities(specs.TABLE, info.key, priorities)
      else:
        loss_info = self.agent.train(experience)
      loss = loss_info.loss
      done += 1
      if i == steps - 1:  # once per call, not per step: it costs a forward pass
        q_values, _ = self.q_network(experience.observation[:, 0])
        mean_q = tf.reduce_mean(tf.reduce_max(q_values, axis=-1))
    return done, timed_out, loss, versions, mean_q, problems

  def publish(self) -> None:
    self.publisher.publish(self.step, self.q_network)

  def run(self) -> None:
    self._check_signature()
    if self._stop.is_set():
      return
    if self.publisher.latest_version != self.step:
      self.publish()
    dataset = make_dataset(self.config.replay_address, self.specs, self.batch_size,
                           self.config.prefetch_batches)
    iterator = iter(dataset)
    max_steps = self.config.max_train_steps
    last_log, last_step = time.monotonic(), self.step
    backoff = rpc.Backoff()
    log.info("training %s from replay %s; policy API on the trainer port", self.env.env_id,
             self.config.replay_address)
    while not self._stop.is_set() and not (max_steps and self.step >= max_steps):
      before = self.step
      steps = self.steps_per_call if not max_steps else min(self.steps_per_call, max_steps - before)
      try:
        done, timed_out, loss, versions, mean_q, problems = self._train(iterator,
                                                                        tf.constant(steps))
        TRAIN_STEPS.inc(int(done))
        self._drop_bad_items(problems.numpy())
        if timed_out:  # the steps that ran still count
          self._explain_wait()
          iterator = iter(dataset)
        if int(done) == 0:
          continue
      except tf.errors.InvalidArgumentError as e:
        if f"from table '{specs.TABLE}'" not in e.message:
          raise  # not the replay's data: a bug, not something to skip
        self._skip_unreadable_item(e.message)
        iterator = iter(dataset)
        continue
      except (tf.errors.UnavailableError, tf.errors.InternalError,
              tf.errors.CancelledError) as e:
        log.warning("replay at %s unavailable (%s); retrying in %.1fs",
                    self.config.replay_address, e.message.splitlines()[0][:200], backoff.delay)
        backoff.wait(self._stop)
        iterator = iter(dataset)
        continue
      finally:
        self._after_steps(before)
      backoff.reset()
      now = time.monotonic()
      if now - last_log >= self.config.log_every_s:
        step = self.step
        self.last_loss = float(loss)
        self.steps_per_s = (step - last_step) / (now - last_log)
        self.policy_lag = float(step - np.mean(versions.numpy()))
        self.mean_q = float(mean_q)
        LOSS.set(self.last_loss)
        MEAN_Q.set(self.mean_q)
        POLICY_LAG.set(self.policy_lag)
        try:
          self._replay_info()
        except Exception:  # reported by the sampling path if it persists
          pass
        self._summarize(step)
        log.info("train step %d (%.1f/s), loss %.4f, replay %d, published v%d, policy lag %.0f",
                 step, self.steps_per_s, self.last_loss, self.replay_size,
                 self.publisher.latest_version, self.policy_lag)
        last_log, last_step = now, step
    self.checkpoints.save(checkpoint_number=self.step)
    if self.publisher.latest_version != self.step:
      self.publish()
    if self.config.serve_after_max_steps and not self._stop.is_set():
      log.info("reached --max-train-steps %d; serving policy v%d until stopped", max_steps,
               self.publisher.latest_version)
      self._stop.wait()
    log.info("stopped at train step %d", self.step)

  def _after_steps(self, before: int) -> None:
    """Publishes and checkpoints when the last call crossed a multiple of their periods."""
    step = self.step
    if step // self.config.publish_every > before // self.config.publish_every:
      self.publish()
    if step // self.config.checkpoint_every > before // self.config.checkpoint_every:
      self.checkpoints.save(checkpoint_number=step)

  def _drop_bad_items(self, problems: np.ndarray) -> None:
    """Deletes the invalid items sampling found, so they are never sampled again."""
    if not len(problems):
      return
    keys = sorted({int(key) for key in problems[:, 0].view(np.uint64)})
    try:
      self.replay.mutate_priorities(specs.TABLE, deletes=keys)
    except Exception as e:  # replay down: they are left out again when sampled again
      log.warning("could not delete %d invalid items from replay (%s)", len(keys),
                  str(e).splitlines()[0][:200])
    self.bad_items_dropped += len(keys)
    BAD_ITEMS.inc(len(keys))
    found = sorted({PROBLEMS[int(code)] for _, code in problems})
    log.warning("left %d replay item(s) out of training and deleted them (%s; %d so far): "
                "some Reverb client wrote what no collector writes", len(keys), "; ".join(found),
                self.bad_items_dropped)

  def _skip_unreadable_item(self, message: str) -> None:
    """Counts an item Reverb's sampler refused (another dtype or column count)."""
    self.unreadable_items_skipped += 1
    UNREADABLE_ITEMS.inc()
    now = time.monotonic()
    if now - self._unreadable_logged < UNREADABLE_LOG_EVERY_S:
      return  # a small table samples the same item again within seconds
    self._unreadable_logged = now
    reason = next((line for line in message.splitlines() if "from table" in line), message)
    log.error("skipped a replay item that does not match the table signature (%s; %d so far). "
              "Reverb's error does not say which item, so it stays until FIFO removes it; "
              "some Reverb client wrote what no collector writes", reason.strip()[:300],
              self.unreadable_items_skipped)

  def _summarize(self, step: int) -> None:
    with self.summaries.as_default(step=step):
      tf.summary.scalar("trainer/loss", self.last_loss)
      tf.summary.scalar("trainer/train_steps_per_s", self.steps_per_s)
      tf.summary.scalar("trainer/replay_size", self.replay_size)
      tf.summary.scalar("trainer/policy_lag_steps", self.policy_lag)
      tf.summary.scalar("trainer/mean_q", self.mean_q)


def _arm_shutdown_timer(stop: threading.Event) -> None:
  stop.wait()
  faulthandler.dump_traceback_later(SHUTDOWN_TIMEOUT_S, exit=True)


def serve(env: EnvConfig, net: NetworkConfig, agent_config: AgentConfig, config: TrainerConfig,
          stop: threading.Event, security: Security, service_id: str = "trainer") -> None:
  trainer = Trainer(env, net, agent_config, config, stop)
  status = StatusServicer("trainer", service_id, env.env_id, trainer.snapshot)
  summaries = SummaryWriter(os.path.join(config.run_dir, "tensorboard"))

  def services(server):
    fleet_pb2_grpc.add_PolicyServiceServicer_to_server(trainer.publisher, server)
    fleet_pb2_grpc.add_SummaryServiceServicer_to_server(summaries, server)

  server, port = rpc.start_server(
      config.port, status, security=security, extra=services, stop=stop,
      # Ready once it has reached replay and published a policy collectors can load.
      ready=lambda: trainer.replay_size >= 0 and trainer.publisher.latest_version >= 0)
  log.info("policy API, summaries, health and status on port %d", port)
  # Once the service is asked to stop it has SHUTDOWN_TIMEOUT_S to finish.
  # faulthandler's timer is a C thread: it dumps every thread's stack to the
  # log and exits even if a C++ call holds the GIL (trainers hung after their
  # final checkpoint twice, tearing down a tf.data iterator whose workers
  # waited for the GIL in a Python callback; dataset.py has none now).
  threading.Thread(target=_arm_shutdown_timer, args=(stop,), name="shutdown-timer",
                   daemon=True).start()
  try:
    trainer.run()
  finally:
    trainer.publisher.close()  # ends the watch streams, so that stopping cancels none
    server.stop(grace=2)
    summaries.close()
