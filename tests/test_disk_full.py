"""A full disk is an alert, not a crash: a CartPole fleet whose volume fills, then frees.

Replay checkpoints and the trainer's run directory live on a small tmpfs of
their own, which the test fills to the last byte while the fleet trains.
Training and collecting go on, every skipped write is logged and reported
(status counter, health name `persistence`, readiness unchanged), nothing
half-written stays, and when the space is back checkpoints and publications
resume by themselves.
"""

import json
import os
import subprocess

import pytest

from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.persistence import PERSIST_HEALTH, append_whole, is_out_of_space
from support import (
  cartpole_collector_args,
  free_port,
  required,
  service_args,
  start_trainer,
  wait_until,
)


@pytest.fixture
def small_disk(tmp_path):
  if os.geteuid() != 0:
    required("root (to mount a tmpfs)")
  disk = tmp_path / "disk"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
  yield disk
  subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> None:
  """Writes until the filesystem has no byte left (unbuffered: nothing is left to flush)."""
  fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  try:
    for chunk in (1 << 20, 4096, 1):
      try:
        while os.write(fd, b"\0" * chunk):
          pass
      except OSError:
        pass
  finally:
    os.close(fd)


def checkpoints(run_dir) -> set[str]:
  return {p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")}


@pytest.mark.slow
def test_a_full_disk_is_logged_and_reported_while_the_fleet_trains_on(services, small_disk):
  replay_port, replay_status, trainer_port = free_port(), free_port(), free_port()
  replay = services(
    "replay",
    *service_args(
      "replay",
      env_id="CartPole-v1",
      port=replay_port,
      status_port=replay_status,
      checkpoint_dir=small_disk / "replay",
      checkpoint_every_s=2,
    ),
  )
  services("collector", *cartpole_collector_args(replay_port, trainer_port, free_port()))
  run_dir = small_disk / "run"
  trainer = start_trainer(
    services,
    replay_port,
    trainer_port,
    run_dir,
    checkpoint_every=200,
    publish_every=100,
    log_every_s=1,
  )
  status = lambda: rpc.get_status(f"localhost:{trainer_port}", timeout=5).counters
  replay_status_now = lambda: rpc.get_status(f"localhost:{replay_status}", timeout=5).counters
  healthy = lambda port: rpc.check_health(f"localhost:{port}", service=PERSIST_HEALTH)
  wait_until(lambda: status().train_steps > 300 and checkpoints(run_dir), 180, "training")
  # Health names follow their checks every second.
  wait_until(lambda: healthy(trainer_port) and healthy(replay_status), 10, "health: persisting")

  fill(small_disk)
  wait_until(lambda: status().persist_failing >= 1, 60, "the trainer to report the full disk")
  wait_until(lambda: replay_status_now().persist_failing == 1, 30, "replay to report it")
  full_at = status()
  saved = checkpoints(run_dir)
  # Training, collecting and serving go on; readiness stays, the health name says it.
  wait_until(lambda: status().train_steps > full_at.train_steps + 500, 120, "training on")
  assert not healthy(trainer_port) and not healthy(replay_status)
  assert rpc.check_health(f"localhost:{trainer_port}", service=rpc.READINESS)
  assert status().published_version == full_at.published_version  # nothing new announced
  assert checkpoints(run_dir) == saved
  for log, what in ((trainer.log(), "training checkpoint"), (replay.log(), "replay checkpoint")):
    assert log.count(f"no space left for the {what}") == 1, what  # once per outage
    assert "Traceback" not in log, what  # an alert, not an error it did not expect
  # Nothing half-written is left to be read back.
  assert not list((run_dir / "checkpoints").glob("*_temp*"))
  assert not list((run_dir / "policies").glob(".tmp-*"))

  (small_disk / "filler").unlink()
  wait_until(lambda: status().persist_failing == 0, 60, "the trainer to write again")
  wait_until(lambda: replay_status_now().persist_failing == 0, 30, "replay to checkpoint again")
  wait_until(lambda: checkpoints(run_dir) - saved, 60, "a new training checkpoint")
  wait_until(
    lambda: status().published_version > full_at.published_version, 60, "a new publication"
  )
  wait_until(lambda: healthy(trainer_port) and healthy(replay_status), 10, "health: persisting")
  assert "training checkpoint written to" in trainer.log()
  assert trainer.proc.poll() is None and replay.proc.poll() is None
  assert trainer.stop() == 0 and replay.stop() == 0


def test_a_history_line_is_appended_whole_or_not_at_all(small_disk):
  """The evaluator's history on a full disk: the write fails with ENOSPC and leaves the
  file as it was (no half line for a reader), and the same line goes in once space is back."""
  history = small_disk / "history.jsonl"
  append_whole(history, '{"version": 1}\n')
  fill(small_disk)
  line = json.dumps({"version": 2, "returns": [1.0] * 5000}) + "\n"  # more than a page
  with pytest.raises(OSError) as raised:
    append_whole(history, line)
  assert is_out_of_space(raised.value)
  assert history.read_text() == '{"version": 1}\n'
  (small_disk / "filler").unlink()
  assert append_whole(history, line)
  assert [json.loads(x)["version"] for x in history.read_text().splitlines()] == [1, 2]
