"""One learning run, recorded: `dqnfleet up` for a given time, then the final evaluation.

Runs `dqnfleet up` (Breakout and every other default, as `make run` does,
unless flags after `--` say otherwise) on a fresh run directory for
`--minutes`, stops it with Ctrl-C as a user would (the trainer checkpoints
and publishes its newest version), evaluates that version with
`dqnfleet evaluate` (Nature protocol: `--episodes` games at epsilon 0.05),
and appends one JSON line to `--out`: the settings, the commit, train steps
and their rate, the fleet's agent steps and frames, the evaluator's history,
the CPU seconds each service used (how the 2 cores were shared: Linux /proc)
and the final evaluation. bench/plot_learning_curve.py redraws the plots of
docs/breakout.md from those lines.

    .venv/bin/python bench/learning_run.py --minutes 60 --label default-seed0 -- --seed 0

A learning run is a benchmark: an hour of the whole machine, never a test.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from dqnfleet.core.settings.config import frames_per_agent_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEP = re.compile(r"train step (\d+) \(([\d.]+)/s\)")
COLLECTOR_STOPPED = re.compile(r"stopped after (\d+) env steps")


def new_run_dir(name: str) -> pathlib.Path:
  """A fresh run directory, runs/bench-<name>-<UTC time>."""
  return ROOT / "runs" / f"bench-{name}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}"


def up_record(run_dir: pathlib.Path) -> dict:
  """What ran, as `up` wrote it down when it started (run.json): among it the commit of
  the dqnfleet it ran (PYTHONPATH may name another checkout), "-dirty" if that had
  changes."""
  return json.loads((run_dir / "run.json").read_text())["up"]


def trainer_rates(run_dir: pathlib.Path) -> list[tuple[int, float]]:
  """(train step, steps/s over the interval before it) of each progress line the
  trainer logged."""
  log = (run_dir / "logs" / "trainer.log").read_text(errors="replace")
  return [(int(step), float(rate)) for step, rate in TRAIN_STEP.findall(log)]


def env_steps_at_end(run_dir: pathlib.Path) -> int:
  """Agent steps of the whole fleet when `up` stopped: the sum of the count each
  collector logged as it stopped (a restarted collector counts its last life only)."""
  total = 0
  for log in sorted((run_dir / "logs").glob("collector-*.log")):
    stopped = COLLECTOR_STOPPED.findall(log.read_text(errors="replace"))
    total += int(stopped[-1]) if stopped else 0
  return total


def cpu_seconds(up_pid: int) -> dict[str, float]:
  """CPU seconds (user + system) used so far by `up` and each of its services, by
  command (collectors summed); {} where /proc is not there to read."""
  tick, used = os.sysconf("SC_CLK_TCK"), {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name
      pid, ppid = int(stat.parent.name), int(fields[1])
      if pid != up_pid and ppid != up_pid:
        continue
      argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError, ValueError):  # ended meanwhile
      continue
    name = "up" if pid == up_pid else argv[argv.index(b"dqnfleet") + 1].decode()
    used[name] = round(used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick, 1)
  return used


def train(
  run_dir: pathlib.Path, minutes: float, up_flags: list[str], env: dict | None = None
) -> tuple[float, dict]:
  """`dqnfleet up` for `minutes` (in environment `env`, default this one's), then Ctrl-C;
  returns the seconds it trained and the CPU seconds each service had used by then."""
  command = [sys.executable, "-m", "dqnfleet", "up", f"--run-dir={run_dir}", *up_flags]
  up = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
  )
  began = time.monotonic()
  try:
    up.wait(timeout=minutes * 60)
    raise SystemExit(f"`dqnfleet up` ended early with {up.returncode}; see {run_dir}/logs")
  except subprocess.TimeoutExpired:
    pass
  trained_s, cpu = time.monotonic() - began, cpu_seconds(up.pid)
  up.send_signal(signal.SIGINT)  # as Ctrl-C: the trainer checkpoints and publishes
  up.wait(timeout=300)
  return trained_s, cpu


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=60.0, help="how long `up` trains")
  parser.add_argument("--label", required=True, help="the run's name in the results file")
  parser.add_argument("--episodes", type=int, default=10, help="games of the final evaluation")
  parser.add_argument("--out", default=str(ROOT / "docs/data/learning-runs.jsonl"))
  parser.add_argument("--run-dir", default="", help="default: runs/bench-<label>-<time>")
  parser.add_argument(
    "--recorded",
    action="store_true",
    help="the run in --run-dir has already trained for --minutes (its evaluation failed, "
    "say): evaluate and record it without running `up`",
  )
  parser.add_argument("up_flags", nargs="*", help="flags for `dqnfleet up`, after --")
  args = parser.parse_args()
  if args.recorded and not args.run_dir:
    parser.error("--recorded needs --run-dir")
  run_dir = pathlib.Path(args.run_dir) if args.run_dir else new_run_dir(args.label)
  trained_s, cpu = (
    (args.minutes * 60, {}) if args.recorded else train(run_dir, args.minutes, args.up_flags)
  )
  started = up_record(run_dir)
  revision = started["git_revision"]
  rates = trainer_rates(run_dir)
  history_path = run_dir / "eval" / "history.jsonl"
  history = (
    [json.loads(line) for line in history_path.read_text().splitlines() if line]
    if history_path.exists()
    else []
  )
  evaluation = subprocess.run(  # a run directory's newest published version
    [sys.executable, "-m", "dqnfleet", "evaluate", f"--policy={run_dir}", "--json"]
    + [f"--episodes={args.episodes}", "--epsilon=0.05"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  final = json.loads(evaluation.stdout.strip().splitlines()[-1])
  env_steps = env_steps_at_end(run_dir)
  logged_rates = sorted(rate for _, rate in rates)
  record = {
    "label": args.label,
    "commit": revision.removesuffix("-dirty")[:7],
    "dirty": revision.endswith("-dirty"),
    "started_at": started["started_at"],
    "command": "dqnfleet up " + " ".join(args.up_flags),
    # The process settings a run was given outside its flags.
    "environment": {
      k: v
      for k, v in os.environ.items()
      if k.startswith(("DQNFLEET_", "TF_ENABLE_", "TF_NUM_", "OMP_"))
    },
    "minutes": round(trained_s / 60, 2),
    "train_steps": rates[-1][0] if rates else 0,
    "train_steps_per_s": round(rates[-1][0] / trained_s, 2) if rates else 0.0,
    # The median of the trainer's own 10-second rates (the few of start-up included).
    "train_steps_per_s_median": logged_rates[len(logged_rates) // 2] if rates else 0.0,
    # Of the machine's os.cpu_count() cores x minutes; unknown ({}) for --recorded runs.
    "cpu_s": cpu,
    "cores": os.cpu_count(),
    "frames_at_last_evaluation": max([e.get("frames", 0) for e in history] or [0]),
    # Where the final evaluation's policy stands (bench/plot_learning_curve.py draws it).
    "env_steps_at_end": env_steps,
    "frames_at_end": env_steps * frames_per_agent_step(final["env_id"]),
    "history": history,
    "final": final,
  }
  with open(args.out, "a") as out:
    out.write(json.dumps(record) + "\n")
  print(json.dumps({k: v for k, v in record.items() if k != "history"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
