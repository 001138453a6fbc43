"""`dqnfleet up`: the embedded default. CartPole learns within a bounded budget,
a service killed with SIGKILL is restarted and the fleet recovers, Ctrl-C
stops the whole fleet cleanly, and --replay-shards runs replay as several
servers that all fill."""

import contextlib
import functools
import json
import pathlib
import re
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from dqnfleet.cli.up import MAX_RESTARTS
from support import dqnfleet, service_args, start_up, wait_until

RANDOM_POLICY_RETURN = 22  # CartPole-v1's mean return when acting at random
TRAIN_STEPS = 15_000
# Trainer checkpoints and publications every few seconds of CartPole training, replay
# checkpoints every 2 s: a restart has something recent to resume from.
CHECKPOINT_OFTEN = dict(checkpoint_every=200, publish_every=100, checkpoint_every_s=2)


@pytest.mark.slow
def test_cartpole_learns_within_a_bounded_budget(tmp_path):
  run_dir = tmp_path / "run"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dqnfleet",
      "up",
      "--env-id",
      "CartPole-v1",
      "--collectors",
      "2",
      "--run-dir",
      str(run_dir),
      "--max-train-steps",
      str(TRAIN_STEPS),
      "--progress-every-s",
      "5",
    ],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "trainer reached its last train step" in result.stdout
  # Every service stops by itself, even collectors whose inserts the rate
  # limiter holds back once the trainer has stopped sampling.
  assert "did not stop" not in result.stdout, result.stdout[-3000:]
  assert re.search(r"train steps [\d,]+ \(", result.stdout)  # live progress was shown
  for name in ("replay", "trainer", "collector-0", "collector-1"):
    assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
  assert (run_dir / "checkpoints").is_dir() and (run_dir / "tensorboard" / "trainer").is_dir()
  assert any((run_dir / "replay_checkpoints").iterdir())

  evaluation = dqnfleet(
    "evaluate", "--policy", str(run_dir / "policies"), "--episodes", "20", "--json", timeout=600
  )
  assert evaluation.returncode == 0, evaluation.stderr
  report = json.loads(evaluation.stdout)
  assert report["policy_version"] == TRAIN_STEPS and report["episodes"] == 20
  # Well above random: the greedy policy balances the pole three times longer
  # or more. DQN's greedy return still swings from version to version; with
  # the default reward scaling, 104 to 500 were seen from 5k train steps on
  # (docs/performance.md), so the margin over 66 is wide.
  print("greedy mean return after", TRAIN_STEPS, "train steps:", report["mean_return"])
  assert report["mean_return"] >= 3 * RANDOM_POLICY_RETURN, report


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
  running = []
  for process in processes:
    with contextlib.suppress(psutil.NoSuchProcess):
      if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        running.append(process)
  return running


def wait_for_progress(up: subprocess.Popen, lines: list[str]) -> None:
  """Reads `up`'s output into `lines` until its first progress line with live services."""

  def progressed():
    line = up.stdout.readline()
    lines.append(line)
    return "env steps" in line and "starting" not in line

  wait_until(progressed, 240, "the first progress line", interval=0)


@pytest.mark.slow
def test_ctrl_c_stops_every_service(tmp_path):
  up = start_up(env_id="CartPole-v1", collectors=1, run_dir=tmp_path / "run", progress_every_s=1)
  lines: list[str] = []
  wait_for_progress(up, lines)
  children = psutil.Process(up.pid).children(recursive=True)
  assert len(children) >= 3  # replay, trainer, collector
  up.send_signal(signal.SIGINT)
  output = up.communicate(timeout=180)[0]
  assert up.returncode == 0, "".join(lines) + output
  assert "stopped; policies in" in output
  assert not alive(children)


@pytest.mark.slow
def test_up_killed_by_sigkill_takes_its_fleet_along_and_a_run_directory_has_one_owner(tmp_path):
  """While `up` runs, a second `up` or a trainer on its run directory is refused (exit 2,
  naming the holder). `up` killed with SIGKILL (the OOM killer, a CI timeout) leaves no
  service running, and the next `up` takes over the lock the killed one could not release."""
  run_dir = tmp_path / "run"
  up = start_up(env_id="CartPole-v1", collectors=1, run_dir=run_dir, progress_every_s=1)
  try:
    wait_for_progress(up, [])
    children = psutil.Process(up.pid).children(recursive=True)
    assert len(children) >= 3  # replay, trainer, collector
    second = dqnfleet("up", "--env-id=CartPole-v1", f"--run-dir={run_dir}", timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"another up (pid {up.pid} on host" in second.stderr, second.stderr
    trainer = dqnfleet("trainer", "--env-id=CartPole-v1", f"--run-dir={run_dir}", timeout=120)
    assert trainer.returncode == 2, trainer.stdout + trainer.stderr
    fleet_trainer = fleet_process(up, "trainer").pid
    assert f"another trainer (pid {fleet_trainer} on host" in trainer.stderr, trainer.stderr
  finally:
    up.kill()
    up.wait(30)
  wait_until(lambda: not alive(children), 60, "the services of the killed up to stop")

  again = start_up(env_id="CartPole-v1", collectors=1, run_dir=run_dir, progress_every_s=1)
  lines: list[str] = []
  try:
    wait_for_progress(again, lines)
  finally:
    again.send_signal(signal.SIGINT)
    output = "".join(lines) + again.communicate(timeout=180)[0]
  assert again.returncode == 0, output
  assert f"took over {run_dir / '.dqnfleet-up.lock'} from pid {up.pid}" in output, output


def fleet_process(up: subprocess.Popen, role: str, not_pid: int = 0) -> psutil.Process | None:
  """`up`'s running child of `role` ("trainer", "collector", ...), other than `not_pid`."""
  for child in alive(psutil.Process(up.pid).children()):
    with contextlib.suppress(psutil.NoSuchProcess):  # one just killed, reaped while we look
      if child.pid != not_pid and child.cmdline()[3:4] == [role]:  # python -m dqnfleet <role>
        return child
  return None


@pytest.mark.slow
def test_a_service_that_keeps_dying_stops_the_fleet_after_three_restarts(tmp_path):
  up = start_up(env_id="CartPole-v1", collectors=1, run_dir=tmp_path / "run", progress_every_s=1)
  lines: list[str] = []
  threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()
  try:
    wait_until(lambda: "env steps" in "".join(lines), 240, "the first progress line")
    others = [c for c in psutil.Process(up.pid).children() if "collector" not in c.cmdline()]
    killed = 0
    for _ in range(MAX_RESTARTS + 1):
      collector = wait_until(
        lambda: fleet_process(up, "collector", killed), 60, "a (restarted) collector"
      )
      killed = collector.pid
      collector.kill()
    assert up.wait(120) == 1, "".join(lines)
  finally:
    if up.poll() is None:
      resume_and_stop(up, [])
  output = "".join(lines)
  assert output.count("restarting collector-0") == MAX_RESTARTS, output
  assert f"collector-0 died {MAX_RESTARTS + 1} times; stopping the fleet" in output, output
  assert not alive(others)  # replay and trainer were stopped with the fleet


@pytest.mark.slow
def test_a_service_that_refuses_its_settings_is_not_restarted(services, tmp_path):
  """Exit 2 means restarting cannot help. Here the trainer `up` starts refuses its run
  directory, which a trainer started by hand already writes (the directory lock)."""
  run_dir = tmp_path / "run"
  lone = services(  # waits for a replay that never answers, holding the run directory
    "trainer",
    *service_args(
      "trainer",
      env_id="CartPole-v1",
      run_dir=run_dir,
      port=0,
      metrics_port=-1,
      replay_addresses=("localhost:9",),
    ),
  )
  lock = run_dir / ".dqnfleet-trainer.lock"
  wait_until(lambda: lock.exists() and str(lone.proc.pid) in lock.read_text(), 120, "the lock")
  up = start_up(env_id="CartPole-v1", collectors=1, run_dir=run_dir, progress_every_s=1)
  output = up.communicate(timeout=240)[0]
  assert up.returncode == 1, output
  assert "trainer exited with code 2" in output and "restarting trainer" not in output, output
  assert f"another trainer (pid {lone.proc.pid} on host" in output, output
  assert "trainer refused its settings; stopping the fleet" in output, output


def log_since(path, offset: int) -> str:
  """What a service wrote to its log file (appended to across restarts) after `offset` bytes."""
  return path.read_bytes()[offset:].decode(errors="replace")


def recorded_checkpoint_steps(checkpoints) -> list[int]:
  """The train steps of the trainer's checkpoints a restart may resume from: those with
  their ckpt-<step>.index file written and recorded in the manager's `checkpoint` file."""
  written = {int(p.name[len("ckpt-") : -len(".index")]) for p in checkpoints.glob("ckpt-*.index")}
  state = checkpoints / "checkpoint"
  recorded = (
    {
      int(step)
      for step in re.findall(r'all_model_checkpoint_paths: ".*?ckpt-(\d+)"', state.read_text())
    }
    if state.exists()
    else set()
  )
  return sorted(written & recorded)


def resume_and_stop(up: subprocess.Popen, paused: list[psutil.Process]) -> None:
  """Resumes the services a failed check left paused (SIGSTOP), then Ctrl-C to `up`."""
  for process in paused:
    with contextlib.suppress(psutil.NoSuchProcess):
      process.resume()
  up.send_signal(signal.SIGINT)
  up.wait(180)


@pytest.mark.slow
def test_each_service_killed_with_sigkill_is_restarted_and_the_fleet_trains_on(tmp_path):
  """...and each resumes from its newest checkpoint: replay with every item that
  checkpoint held, the trainer at least at that checkpoint's train step."""
  run_dir = tmp_path / "run"
  logs = run_dir / "logs"
  up = start_up(
    env_id="CartPole-v1", collectors=1, run_dir=run_dir, progress_every_s=1, **CHECKPOINT_OFTEN
  )
  lines: list[str] = []
  threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()

  def train_steps() -> int:
    progress = [line for line in lines if "train steps" in line]
    return int(re.search(r"train steps ([\d,]+)", progress[-1]).group(1).replace(",", ""))

  child = functools.partial(fleet_process, up)

  paused = []
  try:
    wait_until(lambda: train_steps() > 300, 240, "training")
    for role, name in (("replay", "replay"), ("trainer", "trainer"), ("collector", "collector-0")):
      log = logs / f"{name}.log"
      if role == "replay":
        # With the one collector, replay's only writer, paused, a checkpoint
        # begun after the pause holds exactly the items its log line counts
        # (FIFO removal only, on insert); the first line after the pause may
        # be of a checkpoint begun before it.
        collector = child("collector")
        assert collector is not None, "no collector process under up"
        collector.suspend()
        paused.append(collector)
        paused_at = log.stat().st_size
        counts = wait_until(
          lambda: (
            len(c := re.findall(r"checkpointed (\d+) items to", log_since(log, paused_at))) >= 2
            and c
          ),
          60,
          "two replay checkpoints while nothing is inserted",
        )
        held = max(int(n) for n in counts[1:])
        assert held > 0, counts
      if role == "trainer":
        newest = wait_until(
          lambda: recorded_checkpoint_steps(run_dir / "checkpoints"), 60, "a trainer checkpoint"
        )[-1]
        assert newest >= 200
      killed_at = log.stat().st_size
      killed = child(role)
      assert killed is not None, f"no {name} process under up"
      killed.send_signal(signal.SIGKILL)
      killed.wait(30)
      wait_until(
        lambda: any(f"restarting {name}" in line for line in lines), 30, f"up to restart {name}"
      )
      # up says "restarting" before it spawns the new process.
      wait_until(
        lambda: (c := child(role)) is not None and c.pid != killed.pid, 30, f"a new {name} process"
      )
      # What the new process logs when it has read its checkpoint.
      logged = lambda pattern: wait_until(
        lambda: re.search(pattern, log_since(log, killed_at)),
        120,
        f"the restarted {name} to log {pattern!r}",
      )
      if role == "replay":
        restored = logged(r"(\d+) items restored from")
        assert int(restored[1]) >= held, (restored[0], held)
        paused.pop().resume()
      if role == "trainer":
        resumed = logged(r"resumed from \S*ckpt-\d+ at train step (\d+)")
        assert int(resumed[1]) >= newest, (resumed[0], newest)
      # Recovered: train steps rise again, over two progress lines after the restart.
      restarted_at = len(lines)
      # (0 while the trainer does not answer yet)
      steps = lambda: [
        n
        for line in lines[restarted_at:]
        if (m := re.search(r"train steps ([\d,]+)", line))
        and (n := int(m.group(1).replace(",", ""))) > 0
      ]
      wait_until(
        lambda: len(steps()) >= 2 and steps()[-1] > steps()[0],
        240,
        f"the fleet to train on after {name} was killed",
      )
    assert up.poll() is None, "".join(lines)
  finally:
    resume_and_stop(up, paused)
  assert up.returncode == 0, "".join(lines)


def numbers(pattern: str, text: str) -> list[int]:
  return [int(n) for n in re.findall(pattern, text)]


@pytest.mark.slow
def test_a_power_cut_loses_only_what_was_not_yet_checkpointed(tmp_path):
  """Every process of a fleet SIGKILLed at once, then `up` again on the same run directory:
  the trainer resumes from its newest checkpoint, replay restores its newest checkpoint
  (and with it the fleet's step count, so epsilon goes on decaying instead of starting at
  1 again), no version announced before goes back, the evaluator's history is appended."""
  run_dir, logs = tmp_path / "run", tmp_path / "run" / "logs"
  settings = dict(
    env_id="CartPole-v1",
    collectors=1,
    run_dir=run_dir,
    progress_every_s=1,
    **CHECKPOINT_OFTEN,
    epsilon_decay_steps=20_000,  # still decaying when the power goes
    evaluator=True,
    every_minutes=0.05,
    episodes=2,
  )
  history = run_dir / "eval" / "history.jsonl"
  up = start_up(**settings)
  lines: list[str] = []
  threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()
  read = lambda name: (logs / f"{name}.log").read_text(errors="replace")
  try:
    wait_until(
      lambda: (
        recorded_checkpoint_steps(run_dir / "checkpoints")[-1:] >= [600]
        and len(numbers(r"checkpointed (\d+) items to", read("replay"))) >= 2
        and history.exists()
        and len(history.read_text().splitlines()) >= 2
      ),
      300,
      "trainer and replay checkpoints and two evaluations",
    )
  finally:
    fleet = psutil.Process(up.pid).children()
    for process in [*fleet, psutil.Process(up.pid)]:  # the children first: `up` would stop them
      process.kill()
    up.wait(30)
  wait_until(lambda: not alive(fleet), 30, "every process of the fleet to be gone")
  checkpointed = recorded_checkpoint_steps(run_dir / "checkpoints")[-1]
  replay_held = numbers(r"checkpointed (\d+) items to", read("replay"))[-1]
  announced = max(numbers(r"acting with policy v(\d+)", read("collector-0")))
  epsilon_then = float(re.findall(r"epsilon ([\d.]+)", read("collector-0"))[-1])
  evaluated = history.read_text()
  offsets = {name: len(read(name).encode()) for name in ("trainer", "replay", "collector-0")}
  since = lambda name: log_since(logs / f"{name}.log", offsets[name])

  again = start_up(**settings)
  lines = []
  threading.Thread(target=lambda: lines.extend(again.stdout), daemon=True).start()
  try:
    resumed = wait_until(
      lambda: numbers(r"resumed from \S*ckpt-\d+ at train step (\d+)", since("trainer")),
      180,
      "the trainer to resume",
    )[0]
    restored = wait_until(
      lambda: numbers(r"(\d+) items restored from", since("replay")), 180, "replay to restore"
    )[0]
    acting = wait_until(
      lambda: re.search(
        r"acting with policy v(\d+) \(was v-1\), epsilon ([\d.]+)", since("collector-0")
      ),
      180,
      "the collector's first policy",
    )
    wait_until(
      lambda: len(history.read_text().splitlines()) > len(evaluated.splitlines()),
      180,
      "an evaluation after the restart",
    )
  finally:
    resume_and_stop(again, [])
  assert resumed >= checkpointed, (resumed, checkpointed)
  assert restored >= replay_held > 0, (restored, replay_held)
  assert int(acting[1]) >= announced, (acting[0], announced)
  # The checkpoint's step count, a few seconds behind the cut: not 1.0 again.
  assert float(acting[2]) < 1.0 and abs(float(acting[2]) - epsilon_then) < 0.1, (
    acting[0],
    epsilon_then,
  )
  assert history.read_text().startswith(evaluated)
  assert again.returncode == 0, "".join(lines)


@pytest.mark.slow
def test_two_replay_shards_fill_and_the_progress_line_names_one_that_does_not_answer(tmp_path):
  run_dir = tmp_path / "run"
  up = start_up(
    env_id="CartPole-v1", replay_shards=2, collectors=1, run_dir=run_dir, progress_every_s=1
  )
  lines: list[str] = []
  threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()
  paused = []
  try:
    header = wait_until(
      lambda: next((line for line in lines if line.startswith("dqnfleet up:")), None),
      60,
      "up's first line",
    )
    shards = re.findall(r"(replay-\d+) :\d+ \(status :(\d+)\)", header)
    assert [name for name, _ in shards] == ["replay-0", "replay-1"], header
    addresses = [f"localhost:{port}" for _, port in shards]
    # Two replay servers, each with a checkpoint directory of its own.
    replays = {
      pathlib.Path(arg.partition("=")[2]).name: c
      for c in psutil.Process(up.pid).children()
      if c.cmdline()[3:4] == ["replay"]
      for arg in c.cmdline()
      if arg.startswith("--checkpoint-dir=")
    }
    assert sorted(replays) == ["replay-0_checkpoints", "replay-1_checkpoints"]

    def trained():
      steps = [re.search(r"train steps ([\d,]+)", line) for line in lines]
      return any(m and int(m[1].replace(",", "")) > 0 for m in steps)

    wait_until(trained, 300, "the trainer to train")

    def both_filled():
      result = dqnfleet("status", "--json", *addresses, timeout=60)
      entries = json.loads(result.stdout)
      return result.returncode == 0 and all(e["replay_size"] > 0 for e in entries) and entries

    # The collector writes to both shards (its environments spread over them).
    entries = wait_until(both_filled, 180, "items in both replay shards", interval=2)
    assert [e["role"] for e in entries] == ["replay", "replay"]
    text = dqnfleet("status", *addresses, timeout=60)
    assert text.returncode == 0 and "replay, 2 shards answering: replay size" in text.stdout

    # Progress sums the shards; a shard that does not answer is named.
    wait_until(
      lambda: any(re.search(r"replay [\d,]+ in 2 shards \|", line) for line in lines),
      60,
      "a progress line over both shards",
    )
    replays["replay-1_checkpoints"].suspend()
    paused.append(replays["replay-1_checkpoints"])
    since = len(lines)
    wait_until(
      lambda: any(re.search(r"in 2 shards, down: replay-1 \|", line) for line in lines[since:]),
      60,
      "a progress line naming replay-1 as down",
    )
    paused.pop().resume()
    assert up.poll() is None, "".join(lines)
  finally:
    resume_and_stop(up, paused)
  assert up.returncode == 0, "".join(lines)
  for name, _ in shards:
    assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0, name
    # Each checkpointed its own table at shutdown.
    assert any((run_dir / f"{name}_checkpoints").iterdir()), name
  assert not (run_dir / "replay_checkpoints").exists()


@pytest.mark.parametrize("shards", [1, 16])
def test_up_plans_one_replay_server_per_shard_and_gives_every_client_all(tmp_path, shards):
  """One shard keeps the names of a run directory from before shards; each shard of
  several has its own ports and checkpoint directory, and the trainer and every
  collector are given every shard's address, in order."""
  from dqnfleet.cli import up
  from dqnfleet.cli.commands import COMMANDS
  from dqnfleet.cli.main import build_configs, build_parser
  from dqnfleet.core.settings.config import CollectorConfig, ReplayConfig, TrainerConfig

  argv = ["up", "--replay-shards", str(shards), "--collectors", "2", "--run-dir", str(tmp_path)]
  launches = up.plan(build_configs(COMMANDS["up"], build_parser().parse_args(argv)))
  names = ["replay"] if shards == 1 else [f"replay-{i}" for i in range(shards)]
  assert list(launches) == [*names, "trainer", "collector-0", "collector-1", "evaluator"]
  replays = [launches[name].configs[ReplayConfig] for name in names]
  assert [r.checkpoint_dir for r in replays] == [
    str(tmp_path.resolve() / f"{name}_checkpoints") for name in names
  ]
  ports = []
  for one in launches.values():
    service = one.configs[one.command.service]
    # Each service's own (the trainer's status is on its policy port).
    ports += {
      getattr(service, n) for n in ("port", "status_port", "metrics_port") if hasattr(service, n)
    }
  assert len(set(ports)) == len(ports)  # each service its own, however many shards
  addresses = tuple(f"localhost:{r.port}" for r in replays)
  assert launches["trainer"].configs[TrainerConfig].replay_addresses == addresses
  for name in ("collector-0", "collector-1"):
    assert launches[name].configs[CollectorConfig].replay_addresses == addresses


def test_the_progress_line_copes_with_services_that_do_not_answer_yet():
  from dqnfleet.cli.up import Progress
  from dqnfleet.core.api import fleet_pb2
  from dqnfleet.core.transport.status import decode

  collector = decode(
    fleet_pb2.ServiceStatus(
      role="collector", policy_version=3, counters={"env_steps": 1200}, recent_returns=[2.0, 4.0]
    )
  )
  line = Progress().line({"replay": None, "trainer": None, "collector-0": collector}, 12.0)
  assert "env steps 1,200" in line and "replay - |" in line and "acting v3" in line
  assert "return 3.0 (last 2 episodes)" in line
  # Several shards: the answering ones' sizes summed, the others named.
  replay = decode(fleet_pb2.ServiceStatus(role="replay", replay_size=1500))
  shards = {"replay-0": replay, "replay-1": None, "replay-2": replay, "collector-0": collector}
  line = Progress().line(shards, 13.0)
  assert "replay 3,000 in 3 shards, down: replay-1 |" in line, line
  shards["replay-1"] = replay
  assert "replay 4,500 in 3 shards |" in Progress().line(shards, 14.0)
