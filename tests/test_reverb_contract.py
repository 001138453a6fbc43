"""What dqnfleet relies on in dm-reverb, checked against the installed Reverb on a loopback server.

core/rl/replay_io.py drives Reverb's private pybind writer and reads meaning
into Reverb's error types and texts. When an upgrade breaks one of these, a
test here fails and says which dm-reverb version is installed, what was
expected and what was found, instead of the fleet misbehaving later: a
collector taking back-pressure for a lost server, or a trainer crashing on
an item it should have skipped.
"""

import importlib.metadata
import threading
import time

import numpy as np
import pytest
import reverb
import tensorflow as tf
from reverb import pybind
from tf_agents.trajectories import time_step as ts

from dqnfleet.collector import observer as observer_lib
from dqnfleet.core.rl import replay_io, specs
from dqnfleet.trainer.dataset import make_dataset
from support import acted, free_port, replay_table, tiny_specs

REVERB = importlib.metadata.version("dm-reverb")
TESTED_WITH = "0.14.0"  # requirements.lock's pin
STATES = tiny_specs("states")  # state vectors, k=1, n=1
# The pybind signatures RowWriter calls, as pybind11 documents them.
PRIVATE_API = {
  "Client.NewTrajectoryWriter": (
    pybind.Client,
    "NewTrajectoryWriter",
    "(self: reverb.libpybind.Client, arg0: deepmind::reverb::ChunkerOptions, arg1: bool) "
    "-> deepmind::reverb::TrajectoryWriter",
  ),
  "ConstantChunkerOptions": (
    pybind.ConstantChunkerOptions,
    "__init__",
    "(self: reverb.libpybind.ConstantChunkerOptions, max_chunk_length: int, "
    "num_keep_alive_refs: int) -> None",
  ),
  "TrajectoryWriter.ConfigureChunker": (
    pybind.TrajectoryWriter,
    "ConfigureChunker",
    "(self: reverb.libpybind.TrajectoryWriter, arg0: int, "
    "arg1: reverb.libpybind.ChunkerOptions) -> Status",
  ),
  "TrajectoryWriter.Append": (
    pybind.TrajectoryWriter,
    "Append",
    "(self: reverb.libpybind.TrajectoryWriter, arg0: List[Optional[tensorflow::Tensor]]) "
    "-> List[Optional[reverb.libpybind.WeakCellRef]]",
  ),
  "TrajectoryWriter.CreateItem": (
    pybind.TrajectoryWriter,
    "CreateItem",
    "(self: reverb.libpybind.TrajectoryWriter, arg0: str, arg1: float, "
    "arg2: List[List[reverb.libpybind.WeakCellRef]], arg3: List[bool]) -> None",
  ),
  "TrajectoryWriter.Flush": (
    pybind.TrajectoryWriter,
    "Flush",
    "(self: reverb.libpybind.TrajectoryWriter, arg0: int, arg1: int) -> None",
  ),
  "TrajectoryWriter.EndEpisode": (
    pybind.TrajectoryWriter,
    "EndEpisode",
    "(self: reverb.libpybind.TrajectoryWriter, arg0: bool, arg1: Optional[int]) -> None",
  ),
  "TrajectoryWriter.Close": (
    pybind.TrajectoryWriter,
    "Close",
    "(self: reverb.libpybind.TrajectoryWriter) -> None",
  ),
}


def broken(what: str) -> str:
  return (
    f"dm-reverb {REVERB} (dqnfleet is tested with {TESTED_WITH}): {what}. "
    "core/rl/replay_io.py relies on this; adapt it there (and only there)."
  )


def table(env_specs: specs.EnvSpecs, rate_limiter=None) -> reverb.Table:
  return replay_table(env_specs, rate_limiter=rate_limiter or reverb.rate_limiters.MinSize(1))


@pytest.fixture
def replay():
  """Starts a Reverb server on a loopback port: (server, client, address)."""
  servers = []

  def start(*tables):
    server = reverb.Server(list(tables), port=free_port())
    servers.append(server)
    address = f"localhost:{server.port}"
    return server, reverb.Client(address), address

  yield start
  for server in servers:
    server.stop()


def write(writer: replay_io.RowWriter, env_specs: specs.EnvSpecs, rows: int, dtype=None) -> None:
  """Row r: frame r, action r mod |A|, reward r, version 1000 + r; an item once one fits."""
  layout = replay_io.ItemLayout.of(env_specs)
  for r in range(rows):
    frame = np.full(env_specs.frame.shape, r, dtype or env_specs.frame.dtype)
    writer.append(**specs.row(frame, r % env_specs.num_actions, float(r), 0.5, 1000 + r, 7))
    if r >= layout.frame_rows - 1:
      writer.create_item()


def test_the_private_writer_api_has_the_signatures_row_writer_calls():
  for what, (owner, name, expected) in PRIVATE_API.items():
    method = getattr(owner, name, None)
    assert method is not None, broken(f"the private {what} is gone")
    # pybind11 documents each overload as `Name(signature)`; RowWriter calls this one.
    doc = (method.__doc__ or "").strip()
    found = doc[doc.find("(") :].splitlines()[0] if "(" in doc else doc
    assert found == expected, broken(
      f"{what} changed: expected {name}{expected}, found {name}{found}"
    )
  client = reverb.Client(f"localhost:{free_port()}")  # reads the attribute; connects to nothing
  assert isinstance(getattr(client, "_client", None), pybind.Client), broken(
    "reverb.Client no longer keeps its pybind client in `_client`"
  )


def test_a_flush_the_rate_limiter_holds_back_is_a_timeout(replay):
  """Back-pressure: a table that nobody samples takes a few items, then holds inserts back."""
  limiter = reverb.rate_limiters.SampleToInsertRatio(
    samples_per_insert=1.0, min_size_to_sample=2, error_buffer=2.0
  )
  _, client, _ = replay(table(STATES, limiter))
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(STATES))
  write(writer, STATES, 50)
  started = time.monotonic()
  with pytest.raises(Exception) as raised:
    writer.flush(0, timeout_ms=500)
  waited = time.monotonic() - started
  assert replay_io.is_timeout(raised.value), broken(
    f"a flush held back by the rate limiter raised {type(raised.value).__name__}: "
    f"{raised.value!r}, which replay_io.is_timeout does not take for a timeout (it looks for "
    f"{replay_io.TIMEOUT_TEXT!r}); collectors would take back-pressure for a lost server"
  )
  assert waited < 5, broken(f"a flush with a 0.5 s deadline returned after {waited:.1f} s")
  assert client.server_info()[specs.TABLE].current_size < 50  # really held back
  writer.close()


def test_a_flush_that_completes_raises_nothing(replay):
  _, client, _ = replay(table(STATES))
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(STATES))
  write(writer, STATES, 50)
  writer.flush(0, timeout_ms=10_000)
  assert client.server_info()[specs.TABLE].current_size == 49
  writer.close()


def test_an_item_of_another_dtype_makes_the_samplers_error_unreadable(replay):
  _, client, address = replay(table(STATES))
  rogue = replay_io.RowWriter(client, replay_io.ItemLayout.of(STATES), validate=False)
  write(rogue, STATES, 2, dtype=np.float64)  # the table holds float32 frames
  rogue.end_episode(timeout_ms=10_000)
  rogue.close()
  iterator = iter(make_dataset(address, STATES, 1, 1, gamma=0.9))

  @tf.function
  def sample(it):  # inside a graph, as the learner samples
    return it.get_next_as_optional().has_value()

  with pytest.raises(Exception) as raised:
    sample(iterator)
  error = raised.value
  assert replay_io.is_unreadable_item(error), broken(
    f"sampling an item of another dtype raised {type(error).__name__}: "
    f"{getattr(error, 'message', error)!s:.600}; replay_io.is_unreadable_item expects an "
    f"InvalidArgumentError naming \"from table '{specs.TABLE}'\", so the trainer would stop "
    "instead of skipping the item"
  )
  assert "from table" in replay_io.unreadable_reason(error.message)


def test_a_stopped_server_makes_the_writers_error_a_lost_server(replay):
  """The writer retries an unreachable server until its deadline; what it raises then, and
  what asking the server raises, must both read as a lost server."""
  server, client, _ = replay(table(STATES))
  writer = replay_io.RowWriter(client, replay_io.ItemLayout.of(STATES))
  write(writer, STATES, 10)
  writer.flush(0, timeout_ms=10_000)
  server.stop()
  write(writer, STATES, 3)  # items the stopped server can no longer confirm
  started = time.monotonic()
  with pytest.raises(Exception) as raised:
    writer.flush(0, timeout_ms=1_000)
  waited = time.monotonic() - started
  writer.close()
  assert waited < 10, broken(f"a flush to a stopped server with a 1 s deadline took {waited:.0f} s")
  assert replay_io.is_lost_server(raised.value), broken(
    f"a flush to a stopped server raised {type(raised.value).__name__}: {raised.value!r}, "
    "which replay_io.is_lost_server does not take for a lost server"
  )
  with pytest.raises(Exception) as raised:
    client.server_info(timeout=1)
  assert replay_io.is_lost_server(raised.value), broken(
    f"server_info on a stopped server raised {type(raised.value).__name__}: {raised.value!r}"
  )


def test_a_stopped_server_makes_the_observer_raise_what_the_collector_reconnects_on(
  replay, monkeypatch
):
  server, client, _ = replay(table(STATES))
  monkeypatch.setattr(observer_lib, "WAIT_TIMEOUT_MS", 1_000)
  observer = observer_lib.ReplayObserver([client], STATES, 1, lambda: 1, threading.Event(), 1)
  observation = lambda t: np.full((1, 4), t, np.float32)
  first = ts.TimeStep(
    np.array([ts.StepType.FIRST], np.int32),
    np.zeros(1, np.float32),
    np.ones(1, np.float32),
    observation(0),
  )
  last = ts.TimeStep(
    np.array([ts.StepType.LAST], np.int32),
    np.ones(1, np.float32),
    np.zeros(1, np.float32),
    observation(1),
  )
  server.stop()
  try:
    with pytest.raises(Exception) as raised:  # the episode's end waits for its items
      observer((first, acted([0], 2), last), None)
  finally:
    observer.close(flush_timeout_s=1)  # as the collector does, whatever happened
  assert isinstance(raised.value, observer_lib.ReplayLost), raised.value
  assert replay_io.is_lost_server(raised.value)


def test_errors_that_are_not_replays_are_not_taken_for_it():
  """A bug must surface: nothing else reads as a timeout, a lost server or an unreadable item."""
  assert not replay_io.is_timeout(RuntimeError("Socket closed"))
  assert not replay_io.is_lost_server(ValueError("Column contains expired CellRef."))
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    tf.reshape(tf.zeros([3]), [2])
  assert not replay_io.is_unreadable_item(raised.value)
  assert not replay_io.is_sampler_unavailable(raised.value)
  assert replay_io.is_sampler_unavailable(tf.errors.UnavailableError(None, None, "Socket closed"))
