"""Learning curves from evaluator histories: evaluation return against wall-clock
minutes and against frames, as one PNG (drawn with Pillow, no plotting library).

    .venv/bin/python bench/plot_learning_curve.py runs/a/eval/history.jsonl \
        runs/b/eval/history.jsonl --labels "seed 0" "seed 1" --out docs/img/breakout.png

Each history line is one evaluation written by `dqnfleet evaluator` (in
`dqnfleet up`: <run-dir>/eval/history.jsonl). A run recorded by
bench/learning_run.py is named `docs/data/learning-runs.jsonl:<label>`; its final
evaluation, after `up` stopped, is the last point, drawn as a ring (in the frames panel
only for runs that recorded frames_at_end). Prints one JSON object: the points plotted
per run.
"""

import argparse
import json
import pathlib

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 560, 380, 56
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
GREY = (150, 150, 150)
# Random and human scores per game, drawn as dashed lines: the Atari-57 table (Mnih et al.
# 2015, Table 2, extended by later papers; Dopamine's normalization_utils.py holds the same).
REFERENCES = {
  "Breakout": {"random": 1.7, "human": 30.5},
  "RoadRunner": {"random": 11.5, "human": 7845.0},
}


def load(path: str) -> list[dict]:
  """An evaluator history file, or `<results.jsonl>:<label>`: the history of that run recorded
  by bench/learning_run.py."""
  results, _, label = path.rpartition(":")
  if results.endswith(".jsonl") and label:
    lines = pathlib.Path(results).read_text().splitlines()
    runs = [json.loads(line) for line in lines if line]
    matching = [run for run in runs if run["label"] == label]
    if not matching:
      raise SystemExit(f"{results} holds no run labelled {label!r}")
    run = matching[-1]
    final = {  # the final evaluation, after `up` stopped: drawn as a ring
      "minutes": run["minutes"],
      "frames": run.get("frames_at_end", -1),  # runs recorded before it was, unknown
      "version": run["final"]["policy_version"],
      "mean_return": run["final"]["mean_return"],
      "final": True,
    }
    entries = run["history"] + [final]
  else:
    entries = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
  return [e for e in entries if e.get("minutes", -1) >= 0]


def nice_max(value: float) -> float:
  for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
    if value <= step * 5:
      return step * 5 if value > step * 4 else step * 4
  return value


def panel(draw, box, runs, references, x_key, x_label, x_scale, y_max, font):
  left, top, right, bottom = box
  runs = [([e for e in entries if e.get(x_key, -1) >= 0], label) for entries, label in runs]
  x_max = nice_max(max(max(e[x_key] for e in entries) * x_scale for entries, _ in runs))
  to_xy = lambda x, y: (left + (right - left) * x / x_max, bottom - (bottom - top) * y / y_max)
  for i in range(5):
    y = y_max * i / 4
    draw.line([to_xy(0, y), to_xy(x_max, y)], fill=(235, 235, 235))
    draw.text((left - 6, to_xy(0, y)[1]), f"{y:g}", fill=(0, 0, 0), font=font, anchor="rm")
    x = x_max * i / 4
    draw.text((to_xy(x, 0)[0], bottom + 6), f"{x:g}", fill=(0, 0, 0), font=font, anchor="ma")
  draw.rectangle(box, outline=(0, 0, 0))
  for name, score in references.items():
    if score <= y_max:
      y = to_xy(0, score)[1]
      for x in range(int(left), int(right), 8):
        draw.line([(x, y), (min(x + 4, right), y)], fill=GREY)
      draw.text((right - 4, y - 2), f"{name} {score:g}", fill=GREY, font=font, anchor="rb")
  for (entries, _), colour in zip(runs, COLOURS):
    points = [to_xy(e[x_key] * x_scale, e["mean_return"]) for e in entries]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for (x, y), entry in zip(points, entries):
      ring = {"outline": colour, "width": 2} if entry.get("final") else {"fill": colour}
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], **ring)
  draw.text(((left + right) / 2, bottom + 22), x_label, fill=(0, 0, 0), font=font, anchor="ma")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "histories",
    nargs="+",
    help="evaluator history.jsonl files, or RESULTS.jsonl:LABEL for a run bench/learning_run.py "
    "recorded",
  )
  parser.add_argument("--labels", nargs="*", help="one label per history (default: the path)")
  parser.add_argument(
    "--game",
    default="Breakout",
    choices=sorted(REFERENCES),
    help="the game the runs played: its random and human scores are drawn (default Breakout)",
  )
  parser.add_argument("--title", help="default: '<game>: evaluation return (10 games, ...)'")
  parser.add_argument("--out", default="docs/img/learning_curve.png")
  args = parser.parse_args()
  labels = args.labels or args.histories
  if len(labels) != len(args.histories):
    parser.error(f"--labels: {len(labels)} labels for {len(args.histories)} histories")
  runs = [(load(path), label) for path, label in zip(args.histories, labels)]
  empty = [label for entries, label in runs if not entries]
  if empty:
    parser.error(f"no evaluations with a position in: {', '.join(empty)}")
  y_max = nice_max(max(max(e["mean_return"] for e in entries) for entries, _ in runs))

  image = Image.new("RGB", (2 * WIDTH, HEIGHT + 40), "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  title = args.title or f"{args.game}: evaluation return (10 games, epsilon 0.05)"
  draw.text((WIDTH, 10), title, fill=(0, 0, 0), font=font, anchor="ma")
  panel(
    draw,
    (MARGIN, 40, WIDTH - 16, HEIGHT - MARGIN + 20),
    runs,
    REFERENCES[args.game],
    "minutes",
    "wall-clock minutes",
    1.0,
    y_max,
    font,
  )
  panel(
    draw,
    (WIDTH + MARGIN, 40, 2 * WIDTH - 16, HEIGHT - MARGIN + 20),
    runs,
    REFERENCES[args.game],
    "frames",
    "emulator frames (millions)",
    1e-6,
    y_max,
    font,
  )
  for i, ((_, label), colour) in enumerate(zip(runs, COLOURS)):
    x = MARGIN + 10 + 150 * i
    draw.rectangle([x, HEIGHT + 14, x + 14, HEIGHT + 24], fill=colour)
    draw.text((x + 20, HEIGHT + 19), label, fill=(0, 0, 0), font=font, anchor="lm")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  image.save(out)
  print(
    json.dumps(
      {
        "out": str(out),
        "runs": [
          {
            "label": label,
            "points": [
              [e["minutes"], e["frames"], e["version"], e["mean_return"]] for e in entries
            ],
          }
          for entries, label in runs
        ],
      }
    )
  )


if __name__ == "__main__":
  main()
