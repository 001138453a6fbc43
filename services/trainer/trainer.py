"""The trainer service: replay -> learner -> published policy.

The loop: a `Learner` (trainer/learner.py) takes train steps on batches from
a `ReplaySource` over the replay shards (trainer/replay_source.py, which
also says how it mixes them and what a lost one changes), and triggers (trainer/triggers.py)
publish the policy every `publish_every` train steps as version = train
step, checkpoint it every `checkpoint_every` (trainer/checkpoints.py; a
restart resumes from the newest), and report every `log_every_s` seconds:
the log line, metrics, summaries and the status RPC's counters.
"""

import faulthandler
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from dqnfleet.core.api import fleet_pb2_grpc
from dqnfleet.core.policy.server import PolicyPublisher
from dqnfleet.core.rl import networks, specs
from dqnfleet.core.rl.priorities import TdTarget
from dqnfleet.core.settings.config import (
  INPUT_IN_PROCESS,
  AgentConfig,
  EnvConfig,
  NetworkConfig,
  TrainerConfig,
)
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.core.transport.persistence import PERSIST_HEALTH, Persistence
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import Report, StatusServicer, TrainerCounters
from dqnfleet.core.transport.summaries import SummaryWriter
from dqnfleet.trainer.checkpoints import Checkpoints
from dqnfleet.trainer.input_service import Dispatcher
from dqnfleet.trainer.learner import STEPS_PER_CALL, Learner, StepResult
from dqnfleet.trainer.replay_source import ReplaySource
from dqnfleet.trainer.triggers import Trigger

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 25  # under up's and Kubernetes' 30 s grace
# Health service name: SERVING while every replay shard is sampled from,
# NOT_SERVING while one is lost (the trainer trains on from the others).
SHARDS_HEALTH = "replay-shards"

TRAIN_STEPS = metrics.counter(
  "trainer_train_steps",
  "Gradient steps taken (since this process started; the version counts all).",
)
LOSS = metrics.gauge("trainer_loss", "TD loss of the newest train step.")
MEAN_Q = metrics.gauge(
  "trainer_mean_q",
  "Mean over a sampled batch of the greedy action's "
  "Q-value (grows with what the agent expects to score).",
)
POLICY_LAG = metrics.gauge(
  "trainer_policy_lag_steps",
  "Train steps between the newest policy and the policy that collected "
  "the sampled transitions (mean over a batch).",
)


class Trainer:
  """The training loop and the counters the status RPC reports."""

  def __init__(
    self,
    env: EnvConfig,
    net: NetworkConfig,
    agent_config: AgentConfig,
    config: TrainerConfig,
    stop: threading.Event,
  ):
    self.env, self.config, self._stop = env, config, stop
    self.specs = specs.env_specs(env)
    self.input_service = (
      Dispatcher(config.input_dispatcher_port)
      if config.input_dispatcher_port != INPUT_IN_PROCESS
      else None
    )
    self.replay = ReplaySource(
      config.replay_addresses,
      self.specs,
      env.env_id,
      agent_config.batch_size,
      config.prefetch_batches,
      agent_config.gamma,
      config.sampling_workers,
      stop,
      self.input_service,
    )
    precision = networks.resolve_precision(config.precision, self.specs)
    self.learner = Learner(self.specs, net, agent_config, self.replay, precision)
    self.checkpoints = Checkpoints(os.path.join(config.run_dir, "checkpoints"), self.learner)
    self.checkpoints.resume()
    self.publisher = PolicyPublisher(
      os.path.join(config.run_dir, "policies"),
      env,
      net,
      config.keep_policies,
      td_target=TdTarget(agent_config.gamma, agent_config.reward_scale),
    )
    # Checkpoints, publications and summaries skip a turn on a full disk (persistence.py).
    self.persistence = Persistence()
    self._summary_dir = os.path.join(config.run_dir, "tensorboard", "trainer")
    self.summaries = None  # created at the first report: creating it writes a file
    # No call may cross two multiples of a period: each would fire once.
    self.steps_per_call = min(STEPS_PER_CALL, config.publish_every, config.checkpoint_every)
    self.last_loss = float("nan")
    self.steps_per_s = 0.0
    self.policy_lag = 0.0
    self.mean_q = float("nan")
    self._latest: StepResult | None = None  # the newest call that trained, for reports
    self._reported_step = 0

  @property
  def step(self) -> int:
    return self.learner.train_steps

  def snapshot(self) -> Report:
    return Report(
      TrainerCounters(
        train_steps=self.step,
        loss=self.last_loss,
        train_steps_per_s=self.steps_per_s,
        published_version=self.publisher.latest_version,
        policy_lag_steps=self.policy_lag,
        mean_q=self.mean_q,
        fleet_env_steps=self.replay.fleet_env_steps,
        bad_items_dropped=self.replay.bad_items_dropped,
        unreadable_items_skipped=self.replay.unreadable_items_skipped,
        replay_shards=len(self.replay.shards),
        replay_shards_up=self.replay.shards_up,
        input_workers=self.input_service.workers() if self.input_service else -1,
        persist_failing=self.persistence.failing,
      ),
      policy_version=self.publisher.latest_version,
      replay_size=self.replay.replay_size,
    )

  def publish(self) -> None:
    self.persistence.attempt(
      "policy publication",
      self.publisher.dir,
      lambda: self.publisher.publish(self.step, self.learner.q_network),
    )

  def checkpoint(self) -> None:
    self.persistence.attempt(
      "training checkpoint",
      self.checkpoints.directory,
      self.checkpoints.save,
      clean_up=self.checkpoints.remove_partial,
    )

  def run(self) -> None:
    log.info(
      "CPU kernels: %s",
      "oneDNN"
      if networks.onednn_enabled()
      else "TensorFlow's own (TF_ENABLE_ONEDNN_OPTS=0 or a build without oneDNN; "
      "the stacked-frames layer runs as a 2-D convolution)",
    )
    precision = self.learner.precision
    native = networks.bf16_native()
    log.info(
      "trains in %s (--precision %s; this CPU %s bf16 natively)",
      precision,
      self.config.precision,
      "multiplies" if native else "does not multiply",
    )
    if precision == "bf16" and not native:
      log.warning(
        "bf16 without AVX-512 BF16 or AMX and oneDNN is emulated, about 6x slower than fp32 "
        "(docs/performance.md); --precision fp32 or auto avoids it"
      )
    self.replay.connect()
    if self.replay.prioritized:
      log.info(
        "replay samples by priority: importance exponent %.2f, priorities = |TD error|",
        self.learner.importance_exponent,
      )
    if self._stop.is_set():
      return
    self.replay.start()
    try:
      self._train()
    finally:
      self.replay.close()

  def _train(self) -> None:
    self.learner.trace()
    if self.publisher.latest_version != self.step:
      self.publish()
    max_steps = self.config.max_train_steps
    # In this order after every call, also one that failed: steps that ran count.
    step_triggers = [
      Trigger.every_steps(
        self.config.publish_every, lambda: self.step, lambda step, last: self.publish()
      ),
      Trigger.every_steps(
        self.config.checkpoint_every, lambda: self.step, lambda step, last: self.checkpoint()
      ),
    ]
    report = Trigger.every_seconds(self.config.log_every_s, self._report)
    self._reported_step = self.step
    log.info(
      "training %s from replay %s%s; policy API on the trainer port",
      self.env.env_id,
      self.replay.where,
      ", batches built by input workers" if self.input_service else "",
    )
    while not self._stop.is_set() and not (max_steps and self.step >= max_steps):
      steps = (
        self.steps_per_call if not max_steps else min(self.steps_per_call, max_steps - self.step)
      )
      try:
        with self.replay.sampling():
          result = self.learner.step(steps)
        TRAIN_STEPS.inc(result.steps)
        self.replay.after_step(result)
        if not result.steps:
          continue
      except Exception as e:
        if not self.replay.recover(e):
          raise  # not the replay's data nor its server: a bug, not something to skip
        continue
      finally:
        for trigger in step_triggers:
          trigger()
      self._latest = result
      report()
    self.checkpoint()
    if self.publisher.latest_version != self.step:
      self.publish()
    if self.config.serve_after_max_steps and not self._stop.is_set():
      log.info(
        "reached --max-train-steps %d; serving policy v%d until stopped",
        max_steps,
        self.publisher.latest_version,
      )
      self._stop.wait()
    log.info("stopped at train step %d", self.step)

  def _report(self, now: float, last: float) -> None:
    """The log line, metrics, summaries and status counters of the newest call that trained."""
    step, result = self.step, self._latest
    self.last_loss = result.loss
    self.steps_per_s = (step - self._reported_step) / (now - last)
    self.policy_lag = float(step - np.mean(result.policy_versions))
    self.mean_q = result.mean_q
    LOSS.set(self.last_loss)
    MEAN_Q.set(self.mean_q)
    POLICY_LAG.set(self.policy_lag)
    # Replay's sizes are the shard watcher's, a few seconds old at most.
    self.persistence.attempt(
      "TensorBoard summaries", self._summary_dir, lambda: self._summarize(step)
    )
    shards = len(self.replay.shards)
    log.info(
      "train step %d (%.1f/s), loss %.4f, replay %d, published v%d, policy lag %.0f%s",
      step,
      self.steps_per_s,
      self.last_loss,
      self.replay.replay_size,
      self.publisher.latest_version,
      self.policy_lag,
      f", replay shards {self.replay.shards_up}/{shards} up" if shards > 1 else "",
    )
    self._reported_step = step

  def _summarize(self, step: int) -> None:
    if self.summaries is None:
      self.summaries = tf.summary.create_file_writer(self._summary_dir)
    with self.summaries.as_default(step=step):
      tf.summary.scalar("trainer/loss", self.last_loss)
      tf.summary.scalar("trainer/train_steps_per_s", self.steps_per_s)
      tf.summary.scalar("trainer/replay_size", self.replay.replay_size)
      tf.summary.scalar("trainer/policy_lag_steps", self.policy_lag)
      tf.summary.scalar("trainer/mean_q", self.mean_q)
    self.summaries.flush()  # a full disk shows here, not in a thread of TensorFlow's


def _arm_shutdown_timer(stop: threading.Event) -> None:
  stop.wait()
  faulthandler.dump_traceback_later(SHUTDOWN_TIMEOUT_S, exit=True)


def serve(
  env: EnvConfig,
  net: NetworkConfig,
  agent_config: AgentConfig,
  config: TrainerConfig,
  stop: threading.Event,
  security: Security,
  service_id: str = "trainer",
) -> None:
  trainer = Trainer(env, net, agent_config, config, stop)
  status = StatusServicer("trainer", service_id, env.env_id, trainer.snapshot)
  summaries = SummaryWriter(os.path.join(config.run_dir, "tensorboard"), trainer.persistence)

  def services(server):
    fleet_pb2_grpc.add_PolicyServiceServicer_to_server(trainer.publisher, server)
    fleet_pb2_grpc.add_SummaryServiceServicer_to_server(summaries, server)

  server, port = rpc.start_server(
    config.port,
    status,
    security=security,
    extra=services,
    stop=stop,
    # Ready once it has reached replay and published a policy collectors can load;
    # it stays ready without replay, since collectors still load its policies.
    ready=lambda: trainer.replay.reached() and trainer.publisher.latest_version >= 0,
    health={SHARDS_HEALTH: trainer.replay.all_up, PERSIST_HEALTH: lambda: trainer.persistence.ok},
  )
  log.info("policy API, summaries, health and status on port %d", port)
  # Once the service is asked to stop it has SHUTDOWN_TIMEOUT_S to finish.
  # faulthandler's timer is a C thread: it dumps every thread's stack to the
  # log and exits even if a C++ call holds the GIL (trainers hung after their
  # final checkpoint twice, tearing down a tf.data iterator whose workers
  # waited for the GIL in a Python callback; dataset.py has none now).
  threading.Thread(
    target=_arm_shutdown_timer, args=(stop,), name="shutdown-timer", daemon=True
  ).start()
  try:
    trainer.run()
  finally:
    trainer.publisher.close()  # ends the watch streams, so that stopping cancels none
    server.stop(grace=2)
    summaries.close()
