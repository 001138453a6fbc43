"""Regenerates the Python gRPC code in this folder from `protos/`.

    python -m dqnfleet.core.api.generate [--check]

The output is reproducible (same grpcio-tools, same bytes), so a test runs
this with `--check` and fails when the committed code is stale. protoc writes
absolute imports (`from dqnfleet.v1 import fleet_pb2`) that name the proto
package, not ours, so they are rewritten to relative ones.
"""

import argparse
import pathlib
import re
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "protos"
PROTOS = ["dqnfleet/v1/fleet.proto"]
OUT_DIR = pathlib.Path(__file__).resolve().parent
HEADER = "# Generated from protos/ by `python -m dqnfleet.core.api.generate`. Do not edit.\n"


def generate() -> dict[str, str]:
  """Returns {file name: content} of the generated modules."""
  include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
  with tempfile.TemporaryDirectory() as tmp:
    args = [
      "protoc",
      f"-I{PROTO_ROOT}",
      f"-I{include}",
      f"--python_out={tmp}",
      f"--grpc_python_out={tmp}",
      *PROTOS,
    ]
    if protoc.main(args) != 0:
      raise SystemExit(f"protoc failed on {PROTOS}")
    files = {}
    for path in sorted(pathlib.Path(tmp).rglob("*.py")):
      text = path.read_text()
      text = re.sub(r"^from dqnfleet\.v1 import ", "from . import ", text, flags=re.M)
      files[path.name] = HEADER + text
    return files


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--check",
    action="store_true",
    help="exit 1 if the committed code differs from a fresh generation",
  )
  args = parser.parse_args()
  stale = []
  for name, content in generate().items():
    target = OUT_DIR / name
    if args.check:
      if not target.exists() or target.read_text() != content:
        stale.append(name)
    else:
      target.write_text(content)
  if stale:
    print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
