"""A power cut of a whole CartPole fleet, and how long the fleet takes to come back.

Starts `dqnfleet up` (CartPole, one collector, the evaluator, checkpoints every
200 train steps and every 2 s of replay), waits until it has trained
`--train-steps`, then SIGKILLs every process of the fleet at the same instant
(the services first, so that `up` cannot stop them gracefully) and starts
`up` again on the same run directory. Prints one JSON object: what was lost
(train steps after the newest trainer checkpoint, replay items after the
newest replay checkpoint) and the seconds from the second `up` to each
service's recovery (trainer resumed, replay restored, training again past
the resumed step), measured on the services' own log lines.

    .venv/bin/python bench/power_cut.py [--train-steps 2000]

The numbers in docs/failures.md come from this command.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

import psutil

SETTINGS = [
  "--env-id=CartPole-v1",
  "--collectors=1",
  "--progress-every-s=1",
  "--checkpoint-every=200",
  "--publish-every=100",
  "--checkpoint-every-s=2",
  "--evaluator",
  "--every-minutes=0.2",
]
TRAIN_STEPS = re.compile(r"train steps ([\d,]+)")


class Up:
  """`dqnfleet up` on `run_dir`, its output lines collected as they come, with their times."""

  def __init__(self, run_dir: pathlib.Path):
    self.started = time.monotonic()
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "dqnfleet", "up", *SETTINGS, f"--run-dir={run_dir}"],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines: list[tuple[float, str]] = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.monotonic() - self.started, line))

  def train_steps(self) -> list[tuple[float, int]]:
    found = ((t, TRAIN_STEPS.search(line)) for t, line in self.lines)
    return [(t, int(m.group(1).replace(",", ""))) for t, m in found if m]


def wait(predicate, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.2)
  raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def log_after(path: pathlib.Path, offset: int) -> str:
  return path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-steps", type=int, default=2000, help="trained before the cut")
  args = parser.parse_args()
  run_dir = pathlib.Path(tempfile.mkdtemp(prefix="power-cut-")) / "run"
  logs = run_dir / "logs"
  first = Up(run_dir)
  wait(
    lambda: first.train_steps() and first.train_steps()[-1][1] >= args.train_steps,
    600,
    f"{args.train_steps} train steps",
  )
  fleet = psutil.Process(first.proc.pid).children()
  for process in [*fleet, psutil.Process(first.proc.pid)]:
    process.kill()
  first.proc.wait()
  trained = first.train_steps()[-1][1]  # the newest progress line: up to a second old
  replay_log = (logs / "replay.log").read_text(errors="replace")
  checkpointed_items = [int(n) for n in re.findall(r"checkpointed (\d+) items to", replay_log)]
  offsets = {p.name: p.stat().st_size for p in logs.glob("*.log")}

  collector_log = (logs / "collector-0.log").read_text(errors="replace")
  epsilon_before = float(re.findall(r"epsilon ([\d.]+)", collector_log)[-1])

  second = Up(run_dir)
  since = lambda name: log_after(logs / f"{name}.log", offsets.get(f"{name}.log", 0))
  signs = {  # what each service logs once it has recovered
    "trainer": ("trainer", r"resumed from \S+ at train step (\d+)"),
    "replay": ("replay", r"(\d+) items restored from"),
    "collector": ("collector-0", r"acting with policy v(\d+) \(was v-1\), epsilon ([\d.]+)"),
  }
  seen: dict[str, tuple[float, re.Match]] = {}
  while len(seen) < len(signs) + 1:
    now = time.monotonic() - second.started
    for what, (name, pattern) in signs.items():
      if what not in seen and (m := re.search(pattern, since(name))):
        seen[what] = (now, m)
    if "trainer" in seen and "training" not in seen:
      step = int(seen["trainer"][1].group(1))
      if t := next((t for t, n in second.train_steps() if n > step), None):
        seen["training"] = (t, None)
    if now > 300:
      raise SystemExit(f"timed out; recovered so far: {sorted(seen)}")
    time.sleep(0.2)
  step = int(seen["trainer"][1].group(1))
  second.proc.send_signal(2)
  second.proc.wait(180)
  print(
    json.dumps(
      {
        "benchmark": "power_cut",
        "trained_before_the_cut": trained,
        "resumed_at_train_step": step,
        "train_steps_lost": trained - step,
        "replay_items_in_newest_checkpoint": checkpointed_items[-1] if checkpointed_items else 0,
        "replay_items_restored": int(seen["replay"][1].group(1)),
        "collector_epsilon_before": epsilon_before,
        "collector_epsilon_after": float(seen["collector"][1].group(2)),
        "collector_first_policy_version": int(seen["collector"][1].group(1)),
        "seconds_to": {what: round(t, 1) for what, (t, _) in seen.items()},
        "second_up_exit_code": second.proc.returncode,
      }
    )
  )


if __name__ == "__main__":
  main()
