"""`dqnfleet status`: what each service reports, for people and scripts."""
import json

import grpc

from dqnfleet.core.transport import rpc


def run(addresses: list[str], as_json: bool, timeout: float) -> int:
  results, failed = [], False
  for address in addresses:
    try:
      reply = rpc.get_status(address, timeout)
      entry = as_dict(reply)
      entry["address"] = address
    except grpc.RpcError as e:
      failed = True
      entry = {"address": address, "error": f"{e.code().name}: {e.details()}"}
    results.append(entry)
  if as_json:
    print(json.dumps(results, indent=2, sort_keys=True))
  else:
    for entry in results:
      print(format_entry(entry))
  return 1 if failed else 0


def as_dict(reply) -> dict:
  """A ServiceStatus as plain JSON types (protobuf's own JSON quotes int64s)."""
  return {"role": reply.role, "id": reply.id, "env_id": reply.env_id,
          "policy_version": reply.policy_version, "replay_size": reply.replay_size,
          "counters": dict(reply.counters), "recent_returns": list(reply.recent_returns),
          "uptime_s": reply.uptime_s}


def format_entry(entry: dict) -> str:
  if "error" in entry:
    return f"{entry['address']}: unreachable ({entry['error']})"
  lines = [f"{entry['address']}: {entry['role']} {entry['id']} ({entry['env_id']}), "
           f"up {float(entry['uptime_s']):.0f}s, policy v{entry['policy_version']}, "
           f"replay size {entry['replay_size']}"]
  for name, value in sorted(entry.get("counters", {}).items()):
    lines.append(f"  {name:<20} {value:g}")
  returns = entry.get("recent_returns") or []
  if returns:
    lines.append(f"  recent returns       mean {sum(returns) / len(returns):.1f} over {len(returns)}")
  return "\n".join(lines)
