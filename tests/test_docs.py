"""The README's code tour stays true: it names every module, and nothing else."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = {"core/api/fleet_pb2.py", "core/api/fleet_pb2_grpc.py"}


def code_tour() -> set[str]:
  """The paths under services/ that the tour lists (tree lines, two spaces a level)."""
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"## Code tour\n.*?```\n(.*?)```", readme, re.S)
  assert block, "README.md has no code tour block"
  listed, stack = set(), []
  for line in block.group(1).splitlines():
    name = line.split()[0] if line.strip() else ""
    depth = (len(line) - len(line.lstrip())) // 2
    if not name:
      continue
    stack[depth:] = [name]
    if stack[0] == "services/" and len(stack) > 1:
      listed.add("".join(stack[1:]))
  return listed


def test_the_code_tour_names_every_module_of_the_package():
  modules = {
    str(p.relative_to(ROOT / "services"))
    for p in (ROOT / "services").rglob("*.py")
    if p.name not in ("__init__.py", "__main__.py")
  } - GENERATED
  listed = code_tour()
  assert modules - listed == set(), "modules missing from README's code tour"
  assert {p for p in listed if p.endswith(".py")} - modules == set(), (
    "README's code tour lists modules that do not exist"
  )
