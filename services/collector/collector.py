"""The collector service: driver -> collect policy -> observer -> replay.

E environments step together; the epsilon-greedy collect policy picks all E
actions in one call; the observer writes the transitions to Reverb; the
policy follower swaps in each newly published policy between steps; epsilon
follows the agent steps the whole fleet has written to replay.
"""

import collections
import logging
import threading
import time

import numpy as np
import reverb
import tensorflow as tf
from tf_agents.policies import py_tf_eager_policy

from dqnfleet.collector.driver import PipelinedDriver
from dqnfleet.collector.observer import ReplayObserver, Stopped
from dqnfleet.core.policy.follower import PolicyFollower
from dqnfleet.core.rl import envs, networks, replay_io, specs
from dqnfleet.core.settings.config import CollectorConfig, EnvConfig, NetworkConfig
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import CollectorCounters, Report, StatusServicer
from dqnfleet.core.transport.summaries import SummaryReporter

log = logging.getLogger(__name__)
STEPS_PER_RUN = 16  # driver steps between checks for new policies and stop
RECENT_EPISODES = 20
LOG_EVERY_S = 10.0
# How often the fleet's step count (replay's insert count) is read for epsilon.
FLEET_STEPS_EVERY_S = 2.0

ENV_STEPS = metrics.counter("collector_env_steps", "Environment (agent) steps collected.")
EPISODES = metrics.counter("collector_episodes", "Episodes finished.")
ITEMS = metrics.counter("collector_items", "Replay items (n-step transitions) written.")
# Unclipped game scores: Breakout's run from 0 to a few hundred.
EPISODE_RETURN = metrics.histogram(
  "collector_episode_return",
  "Unclipped return of each finished episode (training mode).",
  buckets=(0, 1, 2, 5, 10, 20, 30, 50, 100, 200, 400, 800),
)
POLICY_VERSION = metrics.gauge("collector_policy_version", "Policy version acting now.")
EPSILON = metrics.gauge("collector_epsilon", "Exploration rate of the collect policy.")


def seed_for(collector_id: str, seed: int) -> int:
  """An explicit seed, or one derived from the id so replicas differ."""
  return seed if seed >= 0 else specs.source_id(collector_id) % (2**31)


def epsilon_at(fleet_steps: int, config: CollectorConfig) -> float:
  """Linear decay over the agent steps the whole fleet has collected."""
  fraction = min(1.0, max(0, fleet_steps) / config.epsilon_decay_steps)
  return config.epsilon_start + fraction * (config.epsilon_end - config.epsilon_start)


def fleet_steps(client: reverb.Client, timeout: float = 5) -> int:
  """Agent steps all collectors have written: one replay item each."""
  table = client.server_info(timeout=timeout)[specs.TABLE]
  return int(table.rate_limiter_info.insert_stats.completed)


class Collector:
  """Runs the collection loop and keeps the counters the status RPC reports."""

  def __init__(
    self,
    env: EnvConfig,
    net: NetworkConfig,
    config: CollectorConfig,
    collector_id: str,
    stop: threading.Event,
    security: Security,
  ):
    self.env_config, self.config, self.id, self._stop = env, config, collector_id, stop
    self.seed = seed_for(collector_id, config.seed)
    tf.random.set_seed(self.seed)
    self.specs = specs.env_specs(env)
    self.network = networks.q_net(self.specs, net)
    self.epsilon = tf.Variable(epsilon_at(0, config), dtype=tf.float32, trainable=False)
    self.policy = py_tf_eager_policy.PyTFEagerPolicy(
      networks.epsilon_greedy(self.specs, self.network, self.epsilon),
      use_tf_function=True,
      batch_time_steps=False,
    )
    # -1: no published policy loaded yet (its own random weights), acting with
    # epsilon_start; status and metrics say so rather than claim v0.
    self.version = -1
    self.fleet_steps = 0
    self.follower = PolicyFollower(
      config.trainer_address, networks.q_net(self.specs, net), stop, security=security
    )
    self.env_steps = 0
    self.episodes = 0
    self.policy_updates = 0
    self.recent_returns = collections.deque(maxlen=RECENT_EPISODES)
    self.connected = False  # to replay: what readiness reports
    # Episode statistics go to the trainer, which writes them for TensorBoard.
    self.summaries = SummaryReporter(
      config.trainer_address, "collector", collector_id, security=security
    )
    # Read when Prometheus scrapes (one collector per process).
    POLICY_VERSION.set_function(lambda: self.version)
    EPSILON.set_function(lambda: float(self.epsilon.numpy()))

  def snapshot(self) -> Report:
    return Report(
      CollectorCounters(
        env_steps=self.env_steps,
        episodes=self.episodes,
        policy_updates=self.policy_updates,
        epsilon=float(self.epsilon.numpy()),
        seed=self.seed,
        fleet_env_steps=self.fleet_steps,
        source_id=specs.source_id(self.id),
      ),
      policy_version=self.version,
      recent_returns=list(self.recent_returns),
    )

  def _apply_new_policy(self) -> None:
    update = self.follower.take()
    if update is None:
      return
    version, weights = update
    self.network.set_weights(weights)
    previous, self.version = self.version, version
    self.epsilon.assign(epsilon_at(self.fleet_steps, self.config))
    self.policy_updates += 1
    log.info(
      "acting with policy v%d (was v%d), epsilon %.3f", version, previous, self.epsilon.numpy()
    )

  def _update_epsilon(self, client: reverb.Client) -> None:
    try:
      self.fleet_steps = max(self.fleet_steps, fleet_steps(client))
    except Exception:  # replay unreachable: the writers notice and reconnect
      return
    if self.version > 0:  # untrained weights (none, v0) act with epsilon_start whatever the count
      self.epsilon.assign(epsilon_at(self.fleet_steps, self.config))

  def _record_episodes(self, env: envs.BatchedEnvironment) -> None:
    while env.finished_episodes:
      _, episode_return, length = env.finished_episodes.popleft()
      self.episodes += 1
      self.recent_returns.append(episode_return)
      EPISODES.inc()
      EPISODE_RETURN.observe(episode_return)
      # On the fleet's step axis, so every collector's points share one x axis.
      self.summaries.scalar("collector/episode_return", self.fleet_steps, episode_return)
      self.summaries.scalar("collector/episode_length", self.fleet_steps, length)

  def _connect(self) -> reverb.Client | None:
    self.connected = False
    client = reverb.Client(self.config.replay_addresses[0])
    ok = rpc.retry(
      lambda: client.server_info(timeout=5),
      f"connecting to replay at {self.config.replay_addresses[0]}",
      self._stop,
    )
    self.connected = ok is not None
    return client if ok is not None else None

  def run(self) -> None:
    self.follower.start()
    self.summaries.start()
    env = envs.BatchedEnvironment(self.env_config, self.config.num_envs, self.seed)
    log.info(
      "%d x %s, seed %d, replay %s, trainer %s",
      self.config.num_envs,
      self.env_config.env_id,
      self.seed,
      self.config.replay_addresses[0],
      self.config.trainer_address,
    )
    backoff = rpc.Backoff()
    try:
      while not self._stop.is_set() and not self._budget_spent():
        client = self._connect()
        if client is None:
          break
        observer = ReplayObserver(
          client,
          self.specs,
          self.config.num_envs,
          lambda: self.version,
          self._stop,
          specs.source_id(self.id),
        )
        try:
          self._collect(env, observer, client)
          backoff.reset()
        except Stopped:
          break
        except Exception as e:
          if not replay_io.is_lost_server(e):
            raise
          # The partial episodes are lost with the writers, so every
          # episode restarts.
          self.connected = False
          log.warning(
            "lost replay at %s (%s); reconnecting in %.1fs",
            self.config.replay_addresses[0],
            str(e).splitlines()[0][:200],
            backoff.delay,
          )
          backoff.wait(self._stop)
        finally:
          observer.close()
    finally:
      env.close()
      self.summaries.close()  # sends the last episodes' scalars
      log.info("stopped after %d env steps, %d episodes", self.env_steps, self.episodes)

  def _budget_spent(self) -> bool:
    return 0 < self.config.max_env_steps <= self.env_steps

  def _collect(self, env, observer: ReplayObserver, client: reverb.Client) -> None:
    driver = PipelinedDriver(env, self.policy, observer)
    time_step = env.reset()
    last_log, last_steps = time.monotonic(), self.env_steps
    last_fleet = 0.0
    while not self._stop.is_set() and not self._budget_spent():
      self._apply_new_policy()
      now = time.monotonic()
      if now - last_fleet >= FLEET_STEPS_EVERY_S:
        self._update_epsilon(client)
        last_fleet = now
      before, items_before = observer.steps_observed, observer.items_written
      time_step = driver.run(time_step, STEPS_PER_RUN)
      self.env_steps += observer.steps_observed - before
      ENV_STEPS.inc(observer.steps_observed - before)
      ITEMS.inc(observer.items_written - items_before)
      self._record_episodes(env)
      if now - last_log >= LOG_EVERY_S:
        rate = (self.env_steps - last_steps) / (now - last_log)
        mean = np.mean(self.recent_returns) if self.recent_returns else float("nan")
        log.info(
          "env steps %d (%.0f/s, fleet %d), episodes %d, mean return %.1f, policy v%d, eps %.3f",
          self.env_steps,
          rate,
          self.fleet_steps,
          self.episodes,
          mean,
          self.version,
          self.epsilon.numpy(),
        )
        self.summaries.scalar("collector/epsilon", self.fleet_steps, float(self.epsilon.numpy()))
        self.summaries.scalar("collector/policy_version", self.fleet_steps, self.version)
        last_log, last_steps = now, self.env_steps


def serve(
  env: EnvConfig,
  net: NetworkConfig,
  config: CollectorConfig,
  stop: threading.Event,
  collector_id: str,
  security: Security,
) -> None:
  collector = Collector(env, net, config, collector_id, stop, security)
  status = StatusServicer("collector", collector_id, env.env_id, collector.snapshot)
  server, port = rpc.start_server(
    config.status_port, status, security=security, stop=stop, ready=lambda: collector.connected
  )
  log.info("health and status on port %d", port)
  try:
    collector.run()
  finally:
    server.stop(grace=1)
