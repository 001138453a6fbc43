"""The trainer's rate inside a fleet, two versions of dqnfleet side by side.

Runs a Breakout `dqnfleet up` (every default, as `make run` does) for
`--minutes` with the dqnfleet of this checkout ("after") and with the one at
`--before` (a directory holding an older checkout's `services/` as
`dqnfleet/`, put on PYTHONPATH), `--pairs` times, each pair's order the
reverse of the last, so drift on a shared machine hits both alike. No final
evaluation: this measures speed, not learning (bench/learning_run.py does
both). Prints one JSON line per run, then a summary: per run, the trainer's
median 10-second rate, its last logged step, and the CPU seconds each
service used (bench/learning_run.py's cpu_seconds), hence the trainer's
steps per CPU second, which is less at the mercy of the others than its rate.

    mkdir -p /tmp/before && git worktree add /tmp/before-tree <commit>
    ln -sfn /tmp/before-tree/services /tmp/before/dqnfleet
    .venv/bin/python bench/fleet_ab.py --before /tmp/before [--minutes 6] [--pairs 2]

A code before 53d8716 needs TF_ENABLE_ONEDNN_OPTS=1 to use the kernels the
newer one turns on itself; this script sets it for both (an own setting wins).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys

# bench/ is on sys.path when a script of it runs
from learning_run import new_run_dir, train, trainer_rates, up_record


def one_run(label: str, pythonpath: str, minutes: float) -> dict:
  run_dir = new_run_dir(f"ab-{label}")
  env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
  _, cpu = train(run_dir, minutes, [], env=env)
  rates = trainer_rates(run_dir)
  steps = rates[-1][0] if rates else 0
  return {
    "label": label,
    "commit": up_record(run_dir)["git_revision"],
    # The first intervals cover start-up (replay filling to its minimum).
    "median_steps_per_s": statistics.median(r for _, r in rates[3:]) if len(rates) > 3 else None,
    "last_logged_step": steps,
    "cpu_s": cpu,
    "steps_per_trainer_cpu_s": round(steps / cpu["trainer"], 2) if cpu.get("trainer") else None,
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True, help="PYTHONPATH holding the older dqnfleet")
  parser.add_argument("--minutes", type=float, default=6.0, help="length of each run")
  parser.add_argument("--pairs", type=int, default=2)
  args = parser.parse_args()
  if not (pathlib.Path(args.before) / "dqnfleet" / "__main__.py").exists():
    parser.error(f"--before {args.before}: no dqnfleet/__main__.py there (see the usage above)")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  runs = []
  for pair in range(args.pairs):
    order = [("after", ""), ("before", args.before)]
    for label, path in order if pair % 2 == 0 else order[::-1]:
      runs.append(one_run(label, path, args.minutes) | {"pair": pair + 1})
      print(json.dumps(runs[-1]), flush=True)

  def median(label: str, key: str) -> float:
    return statistics.median(r[key] for r in runs if r["label"] == label and r[key] is not None)

  ratio = lambda key: round(median("after", key) / median("before", key), 3)
  summary = {
    "benchmark": "fleet_ab",
    "minutes": args.minutes,
    "pairs": args.pairs,
    "after_over_before": {
      "median_steps_per_s": ratio("median_steps_per_s"),
      "steps_per_trainer_cpu_s": ratio("steps_per_trainer_cpu_s"),
    },
  }
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
