"""What the evaluator costs the trainer in a `dqnfleet up` run, from the run's logs.

The trainer logs its train steps/s every 10 s; the evaluator logs when each
evaluation ended and how long it took. Trainer intervals that lie mostly
inside an evaluation are compared with the others, within the same run:

    .venv/bin/python bench/evaluator_cost.py runs/latest

Prints one JSON object: the mean train rate during and outside evaluations,
the fraction of wall-clock time spent evaluating, and the resulting share of
train steps lost over the run.
"""

import argparse
import datetime
import json
import pathlib
import re

TRAIN = re.compile(r"^(\d\d:\d\d:\d\d) INFO trainer\[.*\] train step \d+ \(([\d.]+)/s\)")
EVALUATION = re.compile(r"^(\d\d:\d\d:\d\d) INFO evaluator\[.*\] policy v\d+: .*; (\d+)s$")


def seconds(clock: str) -> int:
  t = datetime.datetime.strptime(clock, "%H:%M:%S")
  return t.hour * 3600 + t.minute * 60 + t.second


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", help="a `dqnfleet up` run directory (with logs/)")
  parser.add_argument("--interval", type=float, default=10.0, help="trainer's --log-every-s")
  args = parser.parse_args()
  logs = pathlib.Path(args.run_dir) / "logs"
  rates = [
    (seconds(m[1]), float(m[2]))
    for line in (logs / "trainer.log").read_text().splitlines()
    if (m := TRAIN.match(line))
  ]
  windows = [
    (seconds(m[1]) - int(m[2]), seconds(m[1]))
    for line in (logs / "evaluator.log").read_text().splitlines()
    if (m := EVALUATION.match(line))
  ]
  # The first evaluation (v0) runs while replay fills, before any training: skip it.
  windows = [w for w in windows if w[1] > rates[0][0]] if rates else []
  during, outside = [], []
  for end, rate in rates[1:]:  # the first line's rate covers start-up
    start = end - args.interval
    overlap = sum(max(0, min(end, b) - max(start, a)) for a, b in windows)
    (during if overlap > args.interval / 2 else outside).append(rate)
  span = rates[-1][0] - rates[0][0] if len(rates) > 1 else 0
  evaluating = sum(b - a for a, b in windows)
  mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
  number = lambda x, digits: None if x != x else round(x, digits)  # NaN is no JSON
  slowdown = 1 - mean(during) / mean(outside) if during and outside else float("nan")
  fraction = evaluating / span if span else float("nan")
  print(
    json.dumps(
      {
        "benchmark": "evaluator_cost",
        "run_dir": args.run_dir,
        "evaluations": len(windows),
        "train_steps_per_s_during_evaluations": number(mean(during), 1),
        "train_steps_per_s_outside": number(mean(outside), 1),
        "intervals_during": len(during),
        "intervals_outside": len(outside),
        "slowdown_while_evaluating": number(slowdown, 3),
        "fraction_of_time_evaluating": number(fraction, 3),
        "train_steps_lost_share": number(slowdown * fraction, 4),
      }
    )
  )


if __name__ == "__main__":
  main()
