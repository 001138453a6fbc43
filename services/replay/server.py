"""The replay service: a Reverb server holding the fleet's replay table.

Collectors insert transitions, the trainer samples batches; a SampleToInsertRatio
rate limiter keeps the number of times each transition is sampled steady,
whichever side is faster. The table's signature is derived from the
environment settings (core/rl/specs.py), so services may start in any order.
"""

import logging
import threading

import reverb

from dqnfleet.core.rl import specs
from dqnfleet.core.settings.config import EnvConfig, ReplayConfig
from dqnfleet.core.settings.flags import ConfigError
from dqnfleet.core.transport import metrics, rpc
from dqnfleet.core.transport.persistence import PERSIST_HEALTH, Persistence
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import ReplayCounters, Report, StatusServicer

log = logging.getLogger(__name__)
CHECKPOINTS = metrics.counter("replay_checkpoints", "Checkpoints of the replay table written.")


def make_table(env: EnvConfig, config: ReplayConfig) -> reverb.Table:
  # The trainer reads the sampler from server_info: with a prioritized one
  # it corrects with importance weights and sends back |TD error| priorities.
  sampler = (
    reverb.selectors.Prioritized(config.priority_exponent)
    if config.prioritized
    else reverb.selectors.Uniform()
  )
  return reverb.Table(
    name=specs.TABLE,
    sampler=sampler,
    remover=reverb.selectors.Fifo(),
    max_size=config.max_size,
    max_times_sampled=0,  # items leave by FIFO only
    rate_limiter=reverb.rate_limiters.SampleToInsertRatio(
      samples_per_insert=config.samples_per_insert,
      min_size_to_sample=config.min_size,
      error_buffer=config.error_buffer(),
    ),
    signature=specs.table_signature(specs.env_specs(env)),
  )


def table_snapshot(client: reverb.Client) -> Report:
  """Counters of the replay table, for the status RPC."""
  info = client.server_info(timeout=5)[specs.TABLE]
  limiter = info.rate_limiter_info
  return Report(
    ReplayCounters(
      replay_size=info.current_size,
      max_size=info.max_size,
      min_size_to_sample=limiter.min_size_to_sample,
      items_inserted=limiter.insert_stats.completed,
      items_sampled=limiter.sample_stats.completed,
      episodes=info.num_episodes,
    ),
    replay_size=info.current_size,
  )


def table_metrics(client: reverb.Client) -> dict:
  """The replay table's Prometheus metrics, read from the server at scrape time."""
  info = client.server_info(timeout=5)[specs.TABLE]
  limiter, worker = info.rate_limiter_info, info.table_worker_time
  return {
    "replay_table_size": ("gauge", "Items (transitions) in the replay table.", info.current_size),
    "replay_table_max_size": ("gauge", "Capacity of the replay table.", info.max_size),
    "replay_inserts_total": (
      "counter",
      "Items inserted since the table was created (restored with a checkpoint).",
      limiter.insert_stats.completed,
    ),
    "replay_samples_total": (
      "counter",
      "Items sampled since the table was created.",
      limiter.sample_stats.completed,
    ),
    # Reverb's table worker counts the time it holds one side back waiting
    # for the other: inserts wait for samples when collectors outrun the
    # trainer, samples wait for inserts when the trainer outruns them.
    "replay_insert_blocked_seconds_total": (
      "counter",
      "Seconds the rate limiter held inserts back, waiting for samples.",
      worker.waiting_for_sampling_ms / 1000,
    ),
    "replay_sample_blocked_seconds_total": (
      "counter",
      "Seconds the rate limiter held samples back, waiting for inserts.",
      worker.waiting_for_inserts_ms / 1000,
    ),
  }


def serve(
  env: EnvConfig,
  config: ReplayConfig,
  stop: threading.Event,
  security: Security,
  service_id: str = "replay",
) -> None:
  """Runs the Reverb server until `stop`; checkpoints periodically and at the end."""
  checkpointer = (
    reverb.checkpointers.DefaultCheckpointer(path=config.checkpoint_dir)
    if config.checkpoint_dir
    else None
  )
  # Reverb restores the newest checkpoint under checkpoint_dir while starting.
  server = reverb.Server(
    tables=[make_table(env, config)], port=config.port or None, checkpointer=checkpointer
  )
  client = reverb.Client(f"localhost:{server.port}")
  table = client.server_info(timeout=30)[specs.TABLE]
  # A restored table keeps the signature it was saved with: a checkpoint of
  # another environment (or of an older item layout) would take every insert
  # and sample of this fleet down with signature errors. Refuse it, untouched.
  mismatch = specs.signature_mismatch(table.signature, specs.env_specs(env))
  if mismatch:
    server.stop()
    raise ConfigError(
      f"the replay checkpoint in --checkpoint-dir {config.checkpoint_dir} does not "
      f"match --env-id {env.env_id} ({mismatch}). Start with the settings it "
      "was saved with, or point --checkpoint-dir elsewhere; nothing was deleted"
    )
  size = table.current_size
  log.info(
    "Reverb listening on port %d, table %r (%s), %d items%s",
    server.port,
    specs.TABLE,
    env.env_id,
    size,
    " restored from " + config.checkpoint_dir if size else "",
  )

  persistence = Persistence()  # a checkpoint that finds the disk full is skipped, not fatal

  def snapshot() -> Report:
    try:
      report = table_snapshot(client)
    except reverb.errors.DeadlineExceededError:  # busy checkpointing: sizes unknown for now
      report = Report(ReplayCounters())
    report.counters.persist_failing = persistence.failing
    return report

  metrics.register(metrics.ScrapeTimeCollector(lambda: table_metrics(client)))
  status = StatusServicer("replay", service_id, env.env_id, snapshot)
  side_server, side_port = rpc.start_server(
    config.status_port,
    status,
    security=security,
    stop=stop,
    health={PERSIST_HEALTH: lambda: persistence.ok},
  )
  log.info("health and status on port %d", side_port)

  def checkpoint():
    # The size as the checkpoint begins, the one a restore can check against: collectors
    # go on inserting while it is written, and a size read after it overstates it.
    size = snapshot().replay_size
    # Reverb marks a checkpoint complete last, and restores only complete ones.
    path = persistence.attempt("replay checkpoint", config.checkpoint_dir, client.checkpoint)
    if path is not None:
      CHECKPOINTS.inc()
      log.info("checkpointed %d items to %s", size, path)

  try:
    while not stop.wait(config.checkpoint_every_s or None):
      if checkpointer:
        checkpoint()
  finally:
    side_server.stop(grace=1)
    if checkpointer:
      checkpoint()
    server.stop()
    log.info("stopped")
