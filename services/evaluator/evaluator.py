"""The evaluator service: evaluates published policies while the fleet trains.

It follows the trainer's PolicyService like a collector does (no filesystem
shared with the trainer) and, every `--every-minutes` minutes or
`--every-versions` new versions, plays the newest version by the evaluation
protocol (evaluator/protocol.py) in environments of its own. Each result goes
to <out_dir>/history.jsonl and history.csv, to TensorBoard (sent to the
trainer, which writes it into its logdir), to Prometheus, to the status RPC
(and so to `dqnfleet status` and `up`'s progress line), and the best episode
of the latest evaluation to <out_dir>/best_episode.gif.
"""

import csv
import io
import json
import logging
import pathlib
import threading
import time

import tensorflow as tf

from dqnfleet.core.policy.follower import TRAINER_HEALTH, PolicyFollower
from dqnfleet.core.rl import networks, specs
from dqnfleet.core.settings.config import EvaluatorConfig, ProtocolConfig, frames_per_agent_step
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.core.transport.persistence import PERSIST_HEALTH, Persistence, append_whole
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import EvaluatorCounters, Report, StatusServicer
from dqnfleet.core.transport.summaries import SummaryReporter
from dqnfleet.evaluator import protocol

log = logging.getLogger(__name__)
CSV_FIELDS = (
  "version",
  "minutes",
  "frames",
  "fleet_env_steps",
  "mean_return",
  "median_return",
  "min_return",
  "max_return",
  "std_return",
  "mean_length",
  "episodes",
  "eval_seconds",
  "unix_time",
)
SUMMARIZED = ("mean_return", "median_return", "max_return", "mean_length")
# What the status reports of the newest evaluation, as last_<name> (transport/status.py).
LAST = ("version", "mean_return", "median_return", "max_return", "mean_length", "frames", "minutes")

EVALUATIONS = metrics.counter("evaluator_evaluations", "Evaluations finished.")
POLICY_VERSION = metrics.gauge(
  "evaluator_policy_version", "Policy version of the newest evaluation."
)
RESULT = {
  "mean_return": metrics.gauge("evaluator_return_mean", "Mean episode return, newest evaluation."),
  "median_return": metrics.gauge(
    "evaluator_return_median", "Median episode return, newest evaluation."
  ),
  "max_return": metrics.gauge("evaluator_return_max", "Best episode return, newest evaluation."),
  "mean_length": metrics.gauge(
    "evaluator_episode_length_mean", "Mean episode length in agent steps, newest evaluation."
  ),
}


class Evaluator:
  def __init__(
    self,
    protocol_config: ProtocolConfig,
    config: EvaluatorConfig,
    stop: threading.Event,
    security: Security,
    service_id: str = "evaluator",
  ):
    self.protocol, self.config, self._stop = protocol_config, config, stop
    self._security = security
    # Results go to the trainer, which writes them next to its own summaries.
    self.summaries = SummaryReporter(
      config.trainer_address, "evaluator", service_id, security=security
    )
    self.follower = PolicyFollower(config.trainer_address, None, stop, security=security)
    self.out = pathlib.Path(config.out_dir)
    self.out.mkdir(parents=True, exist_ok=True)
    self.network = None
    self.latest: dict | None = None
    self.evaluations = 0
    self.versions_seen = 0
    self.persistence = Persistence()  # histories and GIFs wait out a full disk
    self._unwritten: dict[str, str] = {}  # history file -> lines a full disk held back

  def snapshot(self) -> Report:
    latest = self.latest or {}
    counters = EvaluatorCounters(
      evaluations=self.evaluations,
      versions_seen=self.versions_seen,
      persist_failing=self.persistence.failing,
      **{f"last_{name}": latest[name] for name in LAST if name in latest},
    )
    env = self.follower.env_config  # known from the first version's manifest
    return Report(
      counters,
      policy_version=latest.get("version", -1),
      recent_returns=latest.get("returns", []),
      env_id=env.env_id if env else "",
    )

  def run(self) -> None:
    self.follower.start()
    self.summaries.start()
    log.info(
      "following policies of %s; evaluating every %s, %d episodes at epsilon %g",
      self.config.trainer_address,
      self._cadence(),
      self.protocol.episodes,
      self.protocol.epsilon,
    )
    newest = None  # (version, weights) not yet evaluated
    since_last = 0  # versions seen since the last evaluation
    last_time = None  # the first version is evaluated at once: the curve's start
    try:
      while not self._stop.wait(1.0):
        update = self.follower.take()
        if update is not None:
          newest, since_last = update, since_last + 1
          self.versions_seen += 1
        if newest is None:
          continue
        now = time.monotonic()
        due = (
          last_time is None
          or (self.config.every_minutes and now - last_time >= 60 * self.config.every_minutes)
          or (self.config.every_versions and since_last >= self.config.every_versions)
        )
        if due:
          self.evaluate(*newest)
          newest, since_last, last_time = None, 0, now
    finally:
      self.summaries.close()  # sends the last evaluation's scalars

  def _cadence(self) -> str:
    parts = []
    if self.config.every_minutes:
      parts.append(f"{self.config.every_minutes:g} minutes")
    if self.config.every_versions:
      parts.append(f"{self.config.every_versions} versions")
    return " or ".join(parts)

  def evaluate(self, version: int, weights) -> dict | None:
    env_config = self.follower.env_config
    env_specs = specs.env_specs(env_config)
    if self.network is None:
      self.network = networks.q_net(env_specs, self.follower.network_config)
    self.network.set_weights(weights)
    fleet = self._fleet_progress()
    started = time.monotonic()
    try:
      result = protocol.run(
        env_config,
        env_specs,
        self.network,
        self.protocol,
        record=True,
        threads=self.config.threads,
        stop=self._stop,
      )
    except protocol.Interrupted:
      log.info("stopped during the evaluation of v%d; nothing recorded for it", version)
      return None
    entry = {
      "version": version,
      **fleet,
      "eval_seconds": round(time.monotonic() - started, 1),
      "unix_time": round(time.time(), 1),
      **result.summary(),
      "protocol": protocol.describe(self.protocol, env_config),
    }
    self._record(entry, result)
    self.latest, self.evaluations = entry, self.evaluations + 1
    log.info(
      "policy v%d: mean return %.1f (median %.1f, max %.1f) over %d episodes, mean "
      "length %.0f steps, at %.1f min and %.2f M frames; %.0fs",
      version,
      entry["mean_return"],
      entry["median_return"],
      entry["max_return"],
      entry["episodes"],
      entry["mean_length"],
      entry["minutes"],
      entry["frames"] / 1e6,
      entry["eval_seconds"],
    )
    return entry

  def _fleet_progress(self) -> dict:
    """Where training stands: the trainer's uptime and the fleet's agent steps."""
    try:
      status = rpc.get_status(self.config.trainer_address, timeout=5, security=self._security)
      steps = status.counters.fleet_env_steps
      minutes = status.uptime_s / 60
    except Exception as e:  # the curve loses its x position, not the evaluation
      log.warning("trainer status unavailable (%s)", rpc.first_line(e))
      steps, minutes = -1, -1.0
    frame_skip = frames_per_agent_step(self.follower.env_config.env_id)
    return {
      "minutes": round(minutes, 2),
      "fleet_env_steps": steps,
      "frames": steps * frame_skip if steps >= 0 else -1,
    }

  def _record(self, entry: dict, result: protocol.Result) -> None:
    csv_new = not (self.out / "history.csv").exists() and "history.csv" not in self._unwritten
    row = io.StringIO(newline="")
    writer = csv.DictWriter(row, CSV_FIELDS, extrasaction="ignore")
    if csv_new:
      writer.writeheader()
    writer.writerow(entry)
    # Kept until written: a full disk delays history lines, it does not lose them.
    for name, text in (
      ("history.jsonl", json.dumps(entry) + "\n"),
      ("history.csv", row.getvalue()),
    ):
      self._unwritten[name] = self._unwritten.get(name, "") + text
    for name, text in list(self._unwritten.items()):
      path = self.out / name
      if self.persistence.attempt(
        "evaluation history", str(path), lambda: append_whole(path, text)
      ):
        del self._unwritten[name]
    if result.best_frames:
      gif = self.out / "best_episode.gif"
      self.persistence.attempt(
        "best-episode GIF",
        str(gif),
        lambda: protocol.write_gif(result.best_frames, gif),
        clean_up=lambda: protocol.gif_temporary(gif).unlink(missing_ok=True),
      )
    EVALUATIONS.inc()
    POLICY_VERSION.set(entry["version"])
    for name in SUMMARIZED:
      RESULT[name].set(entry[name])
      self.summaries.scalar(f"evaluator/{name}", entry["version"], entry[name])
    self.summaries.scalar("evaluator/frames", entry["version"], entry["frames"])


def serve(
  protocol_config: ProtocolConfig,
  config: EvaluatorConfig,
  stop: threading.Event,
  security: Security,
  service_id: str = "evaluator",
) -> None:
  # The evaluator shares the machine with the trainer: keep it to its threads.
  tf.config.threading.set_intra_op_parallelism_threads(config.threads)
  tf.config.threading.set_inter_op_parallelism_threads(config.threads)
  evaluator = Evaluator(protocol_config, config, stop, security, service_id)
  status = StatusServicer("evaluator", service_id, "", evaluator.snapshot)
  server, port = rpc.start_server(
    config.status_port,
    status,
    security=security,
    stop=stop,
    ready=lambda: evaluator.follower.latest_seen >= 0,
    health={
      PERSIST_HEALTH: lambda: evaluator.persistence.ok,
      TRAINER_HEALTH: lambda: evaluator.follower.reachable,
    },
  )
  log.info("health and status on port %d; results in %s", port, evaluator.out)
  try:
    evaluator.run()
  finally:
    server.stop(grace=1)
