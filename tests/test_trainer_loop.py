"""The trainer's parts apart: triggers, the learner's named step result, the replay source's
diagnosis, and the loop that ties them (publish and checkpoint at multiples of their periods),
against a real Reverb table in this process."""

import logging
import threading

import numpy as np
import pytest
import reverb
import tensorflow as tf

from dqnfleet.core.policy import store
from dqnfleet.core.rl import replay_io, specs
from dqnfleet.core.settings.config import AgentConfig, EnvConfig, NetworkConfig, TrainerConfig
from dqnfleet.trainer import dataset
from dqnfleet.trainer.trainer import Trainer
from dqnfleet.trainer.triggers import Trigger
from support import free_port, replay_table

ENV = EnvConfig(env_id="CartPole-v1", n_step=1)
NET = NetworkConfig(fc_layers=(16,))
AGENT = AgentConfig(batch_size=8)


class Counter:
  def __init__(self, value=0):
    self.value = value

  def __call__(self):
    return self.value


def test_a_step_trigger_fires_once_per_call_that_crosses_a_multiple():
  step, fired = Counter(120), []  # resumed at 120: the next multiple of 50 is 150
  trigger = Trigger.every_steps(50, step, lambda now, last: fired.append((now, last)))
  for value in (130, 149, 150, 151, 199, 205, 260, 290, 300):
    step.value = value
    trigger()
  # 260 and 300 cross 250 and 300 one call each; a call crossing two would still fire once.
  assert fired == [(150, 120), (205, 150), (260, 205), (300, 260)]
  assert not trigger()  # nothing moved


def test_a_time_trigger_fires_once_its_period_has_passed_since_it_last_fired():
  clock, fired = Counter(100.0), []
  trigger = Trigger.every_seconds(10, lambda now, last: fired.append((now, last)), clock=clock)
  for value in (105, 110, 115, 119.9, 121, 140):
    clock.value = value
    trigger()
  # Measured from when it last fired, not aligned to multiples of the period.
  assert fired == [(110, 100), (121, 110), (140, 121)]


@pytest.fixture
def replay():
  """A uniform table of CartPole's layout with `items` valid items, in this process."""
  env_specs = specs.env_specs(ENV)
  server = reverb.Server([replay_table(env_specs, max_size=10_000)], port=free_port())
  client = reverb.Client(f"localhost:{server.port}")
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(env_specs))
  rng = np.random.default_rng(0)
  for t in range(201):
    writer.append(**specs.row(rng.normal(size=4).astype(np.float32), t % 2, 1.0, 1.0, 5, 0))
    if t:
      writer.create_item()
  writer.end_episode(timeout_ms=10_000)
  writer.close()
  yield server, client
  server.stop()


def trainer_for(server, run_dir, **settings) -> Trainer:
  config = TrainerConfig(
    replay_addresses=(f"localhost:{server.port}",), port=0, run_dir=str(run_dir), **settings
  )
  return Trainer(ENV, NET, AGENT, config, threading.Event())


def test_calls_are_capped_so_that_no_period_is_crossed_twice(tmp_path):
  config = TrainerConfig(
    replay_addresses=("localhost:1",), run_dir=str(tmp_path), publish_every=3, checkpoint_every=7
  )
  assert Trainer(ENV, NET, AGENT, config, threading.Event()).steps_per_call == 3


def test_the_learner_says_what_a_step_did_and_the_source_deletes_what_it_found(replay, tmp_path):
  server, client = replay
  rogue = replay_io.RowWriter(client, replay_io.ItemLayout(stack=1, n_step=1))
  for reward in (0.0, float("nan")):  # one item no collector writes: its step's reward is NaN
    rogue.append(**specs.row(np.zeros(4, np.float32), 0, reward, 1.0, 5, 0))
  rogue.create_item()
  rogue.end_episode(timeout_ms=10_000)
  rogue.close()
  trainer = trainer_for(server, tmp_path)
  trainer.replay.connect()
  assert not trainer.replay.prioritized and trainer.replay.replay_size == 201
  trainer.replay.start()
  results = []
  while not trainer.replay.bad_items_dropped:  # until a batch sampled the NaN item
    results.append(trainer.learner.step(10))
    trainer.replay.after_step(results[-1])
    assert len(results) < 200, "the invalid item was never sampled"
  result = results[-1]
  assert result.steps == 10 and not result.timed_out and np.isfinite(result.loss)
  assert trainer.step == 10 * len(results)
  assert result.policy_versions.tolist() == [5] * AGENT.batch_size
  assert result.keys.dtype == np.uint64 and result.keys.shape == (AGENT.batch_size,)
  assert result.td_errors.shape == (AGENT.batch_size,) and np.isfinite(result.td_errors).all()
  assert np.isfinite(result.mean_q)
  assert len(result.problems) >= 1 and set(result.problems[:, 1]) == {1}  # not finite
  assert trainer.replay.bad_items_dropped == len(
    {int(k) for k in result.problems[:, 0].view(np.uint64)}
  )
  assert client.server_info()[specs.TABLE].current_size == 200  # deleted by its key


def test_the_source_skips_unreadable_items_and_lets_bugs_through(replay, tmp_path, caplog):
  server, client = replay
  trainer = trainer_for(server, tmp_path)
  trainer.replay.connect()
  trainer.replay.start()
  error = tf.errors.InvalidArgumentError(
    None,
    None,
    "Received incompatible tensor at flattened index 0 from table 'transitions'. "
    "Specification has (dtype, shape): (float, <unknown>).",
  )
  with caplog.at_level(logging.ERROR):
    assert trainer.replay.recover(error)
  assert trainer.replay.unreadable_items_skipped == 1
  assert "skipped a replay item that does not match the table signature" in caplog.text
  assert not trainer.replay.recover(ValueError("a bug"))
  assert not trainer.replay.recover(tf.errors.InvalidArgumentError(None, None, "a bad reshape"))
  assert trainer.learner.step(5).steps == 5  # a fresh iterator samples on


def test_a_wait_for_data_is_a_timed_out_step_and_explained(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(dataset, "SAMPLE_TIMEOUT_MS", 300)
  env_specs = specs.env_specs(ENV)
  server = reverb.Server([replay_table(env_specs, max_size=100, min_size=50)], port=free_port())
  try:
    trainer = trainer_for(server, tmp_path)
    trainer.replay.connect()
    trainer.replay.start()
    result = trainer.learner.step(10)
    assert result.timed_out and result.steps == 0 and trainer.step == 0
    with caplog.at_level(logging.INFO):
      trainer.replay.after_step(result)
    assert "replay holds 0 of the 50 transitions needed before training" in caplog.text
  finally:
    server.stop()


def test_the_loop_publishes_and_checkpoints_at_multiples_of_their_periods(replay, tmp_path):
  server, _ = replay
  trainer = trainer_for(server, tmp_path, publish_every=10, checkpoint_every=20, max_train_steps=25)
  try:
    trainer.run()
  finally:
    trainer.publisher.close()
  assert trainer.step == 25
  # v0 at start; 10 and 20 as the steps cross them; 25 (and a checkpoint) at the end.
  assert store.list_versions(tmp_path / "policies") == [0, 10, 20, 25]
  assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.index")) == [
    "ckpt-20.index",
    "ckpt-25.index",
  ]
  counters = trainer.snapshot().counters
  assert counters.train_steps == 25 and counters.published_version == 25
  assert counters.fleet_env_steps == 200 and counters.bad_items_dropped == 0


def test_a_bf16_trainer_checkpoints_float32_weights_that_an_fp32_trainer_resumes(
  replay, tmp_path, caplog
):
  server, _ = replay
  caplog.set_level(logging.INFO)
  bf16 = trainer_for(server, tmp_path, precision="bf16", checkpoint_every=20, max_train_steps=20)
  try:
    bf16.run()
  finally:
    bf16.publisher.close()
  assert "trains in bf16 (--precision bf16" in caplog.text
  dense = [m for m in bf16.learner.q_network.submodules if isinstance(m, tf.keras.layers.Dense)]
  # The hidden layer computes in bf16, the Q-value head in float32; every weight is float32.
  assert {(m.units, m.compute_dtype) for m in dense} == {(16, "bfloat16"), (2, "float32")}
  assert {v.dtype for v in bf16.learner.q_network.variables} == {tf.float32}
  fp32 = trainer_for(server, tmp_path, precision="fp32")
  assert fp32.step == 20 and fp32.learner.precision == "fp32"
  for resumed, trained in zip(
    fp32.learner.q_network.get_weights(), bf16.learner.q_network.get_weights()
  ):
    np.testing.assert_array_equal(resumed, trained)
