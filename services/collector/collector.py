"""The collector service: driver -> collect policy -> observer -> replay.

E environments step together; the epsilon-greedy collect policy picks all E
actions in one call, each environment with its own epsilon
(collector/exploration.py); the observer writes the transitions, with
priorities from the same call's Q-values, to the replay shards; the policy
follower swaps in each newly published policy between steps. The fleet's
step count (the shards' insert counts, summed) drives the decaying schedule.
"""

import collections
import logging
import threading
import time

import numpy as np
import reverb
import tensorflow as tf
from tf_agents.trajectories import policy_step

from dqnfleet.collector.driver import PipelinedDriver
from dqnfleet.collector.exploration import Exploration
from dqnfleet.collector.observer import ReplayLost, ReplayObserver, Stopped
from dqnfleet.core.policy.follower import TRAINER_HEALTH, PolicyFollower
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
# How often the fleet's step count (the shards' insert counts) is read for
# epsilon, and shards that stopped answering are tried again.
FLEET_STEPS_EVERY_S = 2.0
PROBE_TIMEOUT_S = 2  # Reverb takes whole seconds

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
EPSILON = metrics.gauge(
  "collector_epsilon", "Exploration rate of the collect policy (mean over its environments)."
)


def seed_for(collector_id: str, seed: int) -> int:
  """An explicit seed, or one derived from the id so replicas differ."""
  return seed if seed >= 0 else specs.source_id(collector_id) % (2**31)


def inserted(client: reverb.Client, timeout: float = 5) -> int:
  """Agent steps all collectors have written to one shard: one replay item each."""
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
    self.policy = networks.CollectPolicy(self.specs, self.network)
    self.exploration = Exploration(config, config.num_envs, self.seed)
    # -1: no published policy loaded yet (its own random weights), acting with
    # epsilon_start; status and metrics say so rather than claim v0.
    self.version = -1
    self.addresses = list(config.replay_addresses)
    self.clients = [reverb.Client(address) for address in self.addresses]
    # Each shard's insert count when it last answered: a shard that is down
    # still counts what it had, so epsilon does not jump back.
    self.shard_inserts = [0] * len(self.clients)
    self.observer: ReplayObserver | None = None
    self.td_target = None  # the trainer's, from the newest policy's manifest
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
    EPSILON.set_function(lambda: self.epsilon)

  @property
  def epsilon(self) -> float:
    return float(np.mean(self.exploration.epsilons))

  @property
  def fleet_steps(self) -> int:
    return sum(self.shard_inserts)

  def act(self, time_step) -> policy_step.PolicyStep:
    """The collect policy on a batch of time steps; info: Q-values and the epsilons used."""
    epsilons = self.exploration.before_step(time_step.step_type).copy()
    step = self.policy.action(time_step, epsilons)
    return step._replace(info={"q_values": step.info, "epsilon": epsilons})

  def snapshot(self) -> Report:
    return Report(
      CollectorCounters(
        env_steps=self.env_steps,
        episodes=self.episodes,
        policy_updates=self.policy_updates,
        epsilon=self.epsilon,
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
    self.td_target = self.follower.td_target
    if self.observer is not None:
      self.observer.td_target = self.td_target
    # Untrained weights (none, v0) act with epsilon_start whatever the count.
    self.exploration.update(self.fleet_steps, trained=version > 0)
    self.policy_updates += 1
    log.info("acting with policy v%d (was v%d), epsilon %.3f", version, previous, self.epsilon)

  def _probe_shards(self) -> None:
    """Reads every shard's insert count; tells the observer which shards answer."""
    for shard, client in enumerate(self.clients):
      try:
        self.shard_inserts[shard] = max(
          self.shard_inserts[shard], inserted(client, PROBE_TIMEOUT_S)
        )
      except Exception as e:  # the writers may not have noticed yet
        if not replay_io.is_lost_server(e):
          raise
        if self.observer is not None:
          self.observer.lose_shard(shard, e)
        continue
      if self.observer is not None:
        self.observer.shard_back(shard)
    self.exploration.update(self.fleet_steps, trained=self.version > 0)

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

  def _shards_up(self) -> list[bool]:
    """Which shards answer; raises if none does (rpc.retry waits for one)."""
    up = []
    for client in self.clients:
      try:
        client.server_info(timeout=PROBE_TIMEOUT_S)
        up.append(True)
      except Exception as e:
        if not replay_io.is_lost_server(e):
          raise
        up.append(False)
    if not any(up):
      raise ConnectionError("no replay shard answers")
    return up

  def _connect(self) -> list[bool] | None:
    """Waits until at least one shard answers; which ones do (None: stopped)."""
    self.connected = False
    up = rpc.retry(
      self._shards_up, f"connecting to replay at {', '.join(self.addresses)}", self._stop
    )
    if up is not None and not all(up):
      missing = [a for a, ok in zip(self.addresses, up) if not ok]
      log.warning("replay shard(s) %s do not answer; writing to the others", ", ".join(missing))
    self.connected = up is not None
    return up

  def run(self) -> None:
    self.follower.start()
    self.summaries.start()
    env = envs.BatchedEnvironment(self.env_config, self.config.num_envs, self.seed)
    log.info(
      "%d x %s, seed %d, replay %s, trainer %s",
      self.config.num_envs,
      self.env_config.env_id,
      self.seed,
      ", ".join(self.addresses),
      self.config.trainer_address,
    )
    backoff = rpc.Backoff()
    try:
      while not self._stop.is_set() and not self._budget_spent():
        up = self._connect()
        if up is None:
          break
        observer = self.observer = ReplayObserver(
          self.clients,
          self.specs,
          self.config.num_envs,
          lambda: self.version,
          self._stop,
          specs.source_id(self.id),
          addresses=self.addresses,
          up=up,
        )
        observer.td_target = self.td_target
        try:
          self._collect(env, observer)
          backoff.reset()
        except Stopped:
          break
        except Exception as e:
          if not (isinstance(e, ReplayLost) or replay_io.is_lost_server(e)):
            raise
          # The partial episodes are lost with the writers, so every
          # episode restarts.
          self.connected = False
          log.warning(
            "lost replay at %s (%s); reconnecting in %.1fs",
            ", ".join(self.addresses),
            rpc.first_line(e),
            backoff.delay,
          )
          backoff.wait(self._stop)
        finally:
          observer.close()
          self.observer = None
    finally:
      env.close()
      self.summaries.close()  # sends the last episodes' scalars
      log.info("stopped after %d env steps, %d episodes", self.env_steps, self.episodes)

  def _budget_spent(self) -> bool:
    return 0 < self.config.max_env_steps <= self.env_steps

  def _collect(self, env, observer: ReplayObserver) -> None:
    driver = PipelinedDriver(env, self.act, observer)
    time_step = env.reset()
    last_log, last_steps = time.monotonic(), self.env_steps
    last_fleet = 0.0
    while not self._stop.is_set() and not self._budget_spent():
      # The count first: a policy that waited while replay restored its
      # checkpoint must act at the restored count's epsilon, not at epsilon_start.
      now = time.monotonic()
      if now - last_fleet >= FLEET_STEPS_EVERY_S:
        self._probe_shards()
        last_fleet = now
      self._apply_new_policy()
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
          self.epsilon,
        )
        self.summaries.scalar("collector/epsilon", self.fleet_steps, self.epsilon)
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
    config.status_port,
    status,
    security=security,
    stop=stop,
    ready=lambda: collector.connected,
    health={TRAINER_HEALTH: lambda: collector.follower.reachable},
  )
  log.info("health and status on port %d", port)
  try:
    collector.run()
  finally:
    server.stop(grace=1)
