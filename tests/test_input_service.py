"""Input workers (tf.data service) build the trainer's batches: a real fleet of processes.

Replay, a collector, a trainer with --input-dispatcher-port and `dqnfleet
input-worker` processes: the trainer trains on what the worker streams, both
report it, a worker killed stops the batches without stopping the trainer
(which says that none streams), and a new worker brings them back. That the
batches are item for item the replay layout's is tests/test_sampling.py's,
through a worker as in process.
"""

import signal

import pytest

from dqnfleet.core.transport import rpc
from support import cartpole_collector_args, free_port, service_args, start_trainer, wait_until


def start_worker(services, name: str, dispatcher_port: int) -> tuple:
  status_port = free_port()
  worker = services(
    name,
    *service_args(
      "input-worker",
      dispatcher_address=f"localhost:{dispatcher_port}",
      port=free_port(),
      status_port=status_port,
      metrics_port=-1,
    ),
  )
  return worker, lambda: rpc.get_status(f"localhost:{status_port}", timeout=5).counters


@pytest.mark.slow
def test_the_trainer_trains_on_batches_input_workers_build(services, tmp_path):
  replay_port, trainer_port, dispatcher_port = free_port(), free_port(), free_port()
  services(
    "replay",
    *service_args("replay", env_id="CartPole-v1", port=replay_port, status_port=free_port()),
  )
  services("collector", *cartpole_collector_args(replay_port, trainer_port, free_port()))
  trainer = start_trainer(
    services,
    replay_port,
    trainer_port,
    tmp_path / "run",
    input_dispatcher_port=dispatcher_port,
    log_every_s=1,
  )
  status = lambda: rpc.get_status(f"localhost:{trainer_port}", timeout=5).counters
  wait_until(lambda: status().input_workers == 0, 120, "the trainer's dispatcher")
  # No worker, no batches: the trainer waits and says what it waits for.
  wait_until(
    lambda: "no input worker registered with the dispatcher" in trainer.log(), 30, "the warning"
  )
  assert status().train_steps == 0

  worker, worker_status = start_worker(services, "input-worker", dispatcher_port)
  wait_until(lambda: status().train_steps > 200, 180, "training on the worker's batches")
  assert status().input_workers == 1
  assert worker_status().registered == 1
  assert worker_status().pipelines == 1  # one replay shard: one pipeline
  assert rpc.check_health(f"localhost:{trainer_port}", service=rpc.READINESS)
  assert "batches built by input workers" in trainer.log()

  # The only worker lost: the trainer waits, alive, and a new worker resumes training.
  worker.proc.send_signal(signal.SIGKILL)
  worker.proc.wait()
  stalled = "no batch from the input workers for"
  wait_until(lambda: stalled in trainer.log(), 60, "the trainer to say that no batch comes")
  assert trainer.proc.poll() is None
  _, again = start_worker(services, "input-worker-again", dispatcher_port)
  wait_until(lambda: again().registered == 1, 120, "the new worker to register")
  steps = status().train_steps
  wait_until(lambda: status().train_steps > steps + 200, 120, "training to resume")
  assert status().input_workers == 2  # TensorFlow keeps the lost one registered
  wait_until(lambda: "batches from the input workers again" in trainer.log(), 10, "the log")
  assert trainer.stop() == 0
