"""Policy fan-out: how fast a new version reaches N WatchPolicies streams, and what the
trainer's other calls cost meanwhile.

A server process runs the trainer's policy API as the trainer builds it (a real
PolicyPublisher on rpc.start_server, publishing real versions of the Q-network
with core/policy/store.py). Watcher processes open N streams on loopback with grpc.aio
(`--per-channel` streams share one HTTP/2 connection, `--per-process` streams
one process), as N collectors would. With every stream open (each has received
the current version), this process probes health, GetStatus and FetchPolicy
for `--probe-s` seconds, then has the server publish a new version and goes on
probing until every watcher has it. Delivery latency is the time from the call
to PolicyPublisher.publish (the version is written to disk first) to a
watcher's receiving it; all processes read the same monotonic clock.

With `--fetch`, each watcher then downloads the announced version with
FetchPolicy on its connection, as a collector's PolicyFollower does: the herd
that follows every publication in a real fleet. The round then also reports
when each download completed, how many failed or arrived short, and the CPU
seconds the server process spent from the publication until the last one.

    .venv/bin/python bench/policy_fanout.py [--watchers 100,1000,5000] [--env-id CartPole-v1]
    .venv/bin/python bench/policy_fanout.py --fetch --env-id ALE/Breakout-v5 --watchers 100,1000

Prints one JSON object.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import grpc
import psutil

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.transport import rpc


def emit(**fields) -> None:
  print(json.dumps(fields), flush=True)


def serve(env_id: str) -> None:
  """The trainer's policy API; publishes a new version per line "publish" on stdin."""
  import tempfile

  from dqnfleet.core.transport import runtime

  runtime.prepare_tensorflow()  # before TensorFlow is imported
  from dqnfleet.core.policy.server import PolicyPublisher
  from dqnfleet.core.rl import networks, specs
  from dqnfleet.core.settings.config import EnvConfig, NetworkConfig
  from dqnfleet.core.transport.security import PLAINTEXT
  from dqnfleet.core.transport.status import Report, StatusServicer, TrainerCounters

  env, net = EnvConfig(env_id=env_id), NetworkConfig()
  network = networks.q_net(specs.env_specs(env), net)
  publisher = PolicyPublisher(tempfile.mkdtemp(prefix="fanout-"), env, net, keep=5)
  status = StatusServicer(
    "trainer", "bench", env_id, lambda: Report(TrainerCounters(), publisher.latest_version)
  )
  server, port = rpc.start_server(
    0,
    status,
    security=PLAINTEXT,
    extra=lambda s: fleet_pb2_grpc.add_PolicyServiceServicer_to_server(publisher, s),
  )
  emit(port=port)
  for line in sys.stdin:
    if line.strip() == "publish":
      version = publisher.latest_version + 1
      started = time.monotonic()
      publisher.publish(version, network)
      emit(version=version, published_at=started, publish_call_s=time.monotonic() - started)
  publisher.close()
  server.stop(grace=1)


async def watch(address: str, count: int, per_channel: int, timeout: float, fetch: bool) -> None:
  """`count` streams; says when all are open, then when each receives the next version
  (and, with `fetch`, when each has downloaded it)."""
  first = {}  # stream -> first version received (the current one: the stream is open)
  arrived = {}  # stream -> monotonic time a newer version arrived
  fetched = {}  # stream -> monotonic time its download of that version completed
  failed = []  # streams whose download failed or arrived short
  all_open, all_done = asyncio.Event(), asyncio.Event()

  def finished(i: int) -> None:
    if len(fetched) + len(failed) == count if fetch else len(arrived) == count:
      all_done.set()

  async def download(i: int, stub, info) -> None:
    try:
      received = 0
      async for chunk in stub.FetchPolicy(fleet_pb2.FetchPolicyRequest(version=info.version)):
        received += len(chunk.data)
      if received == sum(f.size_bytes for f in info.files):
        fetched[i] = time.monotonic()
      else:
        failed.append(i)
    except grpc.RpcError:
      failed.append(i)
    finished(i)

  async def stream(i: int, stub) -> None:
    async for info in stub.WatchPolicies(fleet_pb2.WatchPoliciesRequest(after_version=-1)):
      if i not in first:
        first[i] = info.version
        if len(first) == count:
          all_open.set()
      elif info.version > first[i] and i not in arrived:
        arrived[i] = time.monotonic()
        if fetch:
          await download(i, stub, info)
        else:
          finished(i)

  channels = [
    grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
    for _ in range(math.ceil(count / per_channel))
  ]
  stubs = [fleet_pb2_grpc.PolicyServiceStub(channel) for channel in channels]
  # Held here: the loop keeps only weak references to its tasks.
  _tasks = [asyncio.create_task(stream(i, stubs[i // per_channel])) for i in range(count)]
  await asyncio.wait_for(all_open.wait(), timeout)
  emit(open=count)
  try:
    await asyncio.wait_for(all_done.wait(), timeout)
  except TimeoutError:
    pass  # the report says how many did not receive it
  emit(arrived=list(arrived.values()), fetched=list(fetched.values()), fetch_failed=len(failed))
  # Exits without closing anything: the streams end with the connections.
  # (Closing the last grpc.aio channel inside asyncio.run's teardown hung:
  # grpc joins its poller thread from a callback on the loop.)
  os._exit(0)


class Probes:
  """Health, GetStatus and a whole FetchPolicy, each asked every 50 ms in a thread of its own
  (so a slow download does not thin out the health checks)."""

  KINDS = ("health", "status", "fetch")

  def __init__(self, address: str):
    self.address = address
    self.seconds = {kind: [] for kind in self.KINDS}
    self.failed = {kind: 0 for kind in self.KINDS}
    self._stop = threading.Event()
    # Health and status on a new connection each time, as a kubelet and
    # `dqnfleet status` ask; a collector fetches on its open channel.
    self._channel = rpc.channel(address)
    stub = fleet_pb2_grpc.PolicyServiceStub(self._channel)
    probes = {
      "health": lambda: rpc.check_health(address, timeout=5),
      "status": lambda: rpc.get_status(address, timeout=5).role == "trainer",
      "fetch": lambda: self._fetch(stub),
    }
    self._threads = [
      threading.Thread(target=self._run, args=(kind, probe), daemon=True)
      for kind, probe in probes.items()
    ]
    for thread in self._threads:
      thread.start()

  def _fetch(self, stub) -> bool:
    info = stub.GetLatestPolicy(fleet_pb2.GetLatestPolicyRequest(), timeout=5)
    chunks = stub.FetchPolicy(fleet_pb2.FetchPolicyRequest(version=info.version), timeout=30)
    return sum(len(chunk.data) for chunk in chunks) == sum(f.size_bytes for f in info.files)

  def _run(self, kind: str, probe) -> None:
    while not self._stop.wait(0.05):
      started = time.monotonic()
      try:
        ok = probe()
      except grpc.RpcError:
        ok = False
      self.seconds[kind].append(time.monotonic() - started)
      self.failed[kind] += not ok

  def stop(self) -> dict:
    self._stop.set()
    for thread in self._threads:
      thread.join()
    self._channel.close()
    return {
      kind: {
        **percentiles(self.seconds[kind]),
        "calls": len(self.seconds[kind]),
        "failed": self.failed[kind],
      }
      for kind in self.KINDS
    }


def percentiles(values: list[float]) -> dict:
  if not values:
    return {}
  values = sorted(values)
  at = lambda q: values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]
  return {
    "p50": round(statistics.median(values), 4),
    "p99": round(at(0.99), 4),
    "max": round(values[-1], 4),
  }


def read_json(proc: subprocess.Popen, key: str) -> dict:
  for line in proc.stdout:
    if line.startswith("{") and key in (fields := json.loads(line)):
      return fields
  raise RuntimeError(f"a benchmark process exited without reporting {key!r}")


def fan_out(server: subprocess.Popen, address: str, watchers: int, args) -> dict:
  counts = [
    min(args.per_process, watchers - start) for start in range(0, watchers, args.per_process)
  ]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        "--role",
        "watchers",
        "--address",
        address,
        "--count",
        str(count),
        "--per-channel",
        str(args.per_channel),
        "--timeout",
        str(args.timeout),
      ]
      + ["--fetch"] * args.fetch,
      stdout=subprocess.PIPE,
      text=True,
    )
    for count in counts
  ]
  try:
    opened = time.monotonic()
    for proc in procs:
      read_json(proc, "open")
    open_s = time.monotonic() - opened
    probes = Probes(address)
    time.sleep(args.probe_s)
    server_cpu = psutil.Process(server.pid).cpu_times()
    server.stdin.write("publish\n")
    server.stdin.flush()
    published = read_json(server, "published_at")
    reports = [read_json(proc, "arrived") for proc in procs]
    # The server's own CPU from before the publication until every watcher is done
    # (it serves nothing else meanwhile but the probes, ~20 calls a second).
    server_cpu_s = sum(psutil.Process(server.pid).cpu_times()[:2]) - sum(server_cpu[:2])
    probed = probes.stop()
  finally:
    for proc in procs:
      proc.wait(30)
  since = lambda key: [t - published["published_at"] for r in reports for t in r[key]]
  row = {
    "watchers": watchers,
    "processes": len(procs),
    "channels": sum(math.ceil(c / args.per_channel) for c in counts),
    "open_s": round(open_s, 2),
    "version": published["version"],
    "publish_call_s": round(published["publish_call_s"], 4),
    "received": len(since("arrived")),
    "delivery_s": percentiles(since("arrived")),
  }
  if args.fetch:
    row.update(
      fetched=len(since("fetched")),
      fetch_failed=sum(r["fetch_failed"] for r in reports),
      fetched_s=percentiles(since("fetched")),
      server_cpu_s=round(server_cpu_s, 2),
    )
  return {**row, **probed}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--watchers", default="100,1000,5000", help="comma-separated numbers of streams, one round each"
  )
  parser.add_argument("--env-id", default="CartPole-v1", help="whose Q-network is published")
  parser.add_argument("--per-channel", type=int, default=100, help="streams per connection")
  parser.add_argument("--per-process", type=int, default=1000, help="streams per process")
  parser.add_argument(
    "--probe-s",
    type=float,
    default=5.0,
    help="seconds of probing with every stream open, before the publication",
  )
  parser.add_argument(
    "--fetch",
    action="store_true",
    help="each watcher also downloads the version it is told of (FetchPolicy)",
  )
  parser.add_argument("--timeout", type=float, default=120.0)
  parser.add_argument(
    "--role", choices=("main", "server", "watchers"), default="main", help=argparse.SUPPRESS
  )
  parser.add_argument("--address", help=argparse.SUPPRESS)
  parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.role == "server":
    return serve(args.env_id)
  if args.role == "watchers":
    return asyncio.run(watch(args.address, args.count, args.per_channel, args.timeout, args.fetch))

  server = subprocess.Popen(
    [sys.executable, __file__, "--role", "server", "--env-id", args.env_id],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    address = f"localhost:{read_json(server, 'port')['port']}"
    server.stdin.write("publish\n")  # the version watchers receive as they connect
    server.stdin.flush()
    read_json(server, "published_at")
    with rpc.channel(address) as channel:
      policy_bytes = sum(
        f.size_bytes
        for f in fleet_pb2_grpc.PolicyServiceStub(channel)
        .GetLatestPolicy(fleet_pb2.GetLatestPolicyRequest(), timeout=10)
        .files
      )
    rounds = [fan_out(server, address, int(n), args) for n in args.watchers.split(",")]
  finally:
    server.stdin.close()
    server.wait(60)
  print(
    json.dumps(
      {
        "benchmark": "policy_fanout",
        "env_id": args.env_id,
        "policy_bytes": policy_bytes,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "per_channel": args.per_channel,
        "per_process": args.per_process,
        "watchers_fetch": args.fetch,
        "rounds": rounds,
      }
    )
  )


if __name__ == "__main__":
  main()
