"""`dqnfleet status`: what each service reports, for people and scripts."""

import dataclasses
import json

import grpc

from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import Security
from dqnfleet.core.transport.status import Status


def run(addresses: list[str], as_json: bool, timeout: float, security: Security) -> int:
  results, shards, failed = [], [], False
  for address in addresses:
    try:
      status = rpc.get_status(address, timeout, security)
      entry = as_dict(status)
      entry["address"] = address
      if status.role == "replay":
        shards.append(status)
    except grpc.RpcError as e:
      failed = True
      entry = {"address": address, "error": f"{e.code().name}: {e.details()}"}
    results.append(entry)
  if as_json:
    print(json.dumps(results, indent=2, sort_keys=True))
  else:
    for entry in results:
      print(format_entry(entry))
    if len(shards) > 1:
      print(shards_total(shards))
  return 1 if failed else 0


def as_dict(status: Status) -> dict:
  """A status as plain JSON types (protobuf's own JSON quotes int64s)."""
  return dataclasses.asdict(status)


def shards_total(shards: list[Status]) -> str:
  """The table over several replay shards: what the trainer samples from, the collectors fill."""
  return (
    f"replay, {len(shards)} shards answering: replay size "
    f"{_known_sum(s.replay_size for s in shards)}, items inserted "
    f"{_known_sum(s.counters.items_inserted for s in shards)}, items sampled "
    f"{_known_sum(s.counters.items_sampled for s in shards)}"
  )


def _known_sum(counts) -> int:
  # -1 is a count a shard does not know (yet): it adds nothing.
  return sum(c for c in counts if c >= 0)


def format_entry(entry: dict) -> str:
  if "error" in entry:
    return f"{entry['address']}: unreachable ({entry['error']})"
  lines = [
    f"{entry['address']}: {entry['role']} {entry['id']} ({entry['env_id']}), "
    f"up {float(entry['uptime_s']):.0f}s, policy v{entry['policy_version']}, "
    f"replay size {entry['replay_size']}"
  ]
  for name, value in sorted(entry.get("counters", {}).items()):
    lines.append(f"  {name:<20} {value:g}")
  returns = entry.get("recent_returns") or []
  if returns:
    lines.append(
      f"  recent returns       mean {sum(returns) / len(returns):.1f} over {len(returns)}"
    )
  return "\n".join(lines)
