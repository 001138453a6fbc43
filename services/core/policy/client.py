"""Getting a published policy: from a trainer over gRPC, or from a directory.

`fetch` downloads one version's files (PolicyService.FetchPolicy) and
checks them against the announcement's sizes and digests; the policy
follower (policy/follower.py) uses it for every new version, `evaluate` and
`export` through `load`, which also takes a run directory, a policies
directory or one version's directory.
"""

import os
import pathlib
import shutil

import grpc
import tensorflow as tf

from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc
from dqnfleet.core.policy import store
from dqnfleet.core.settings.flags import ConfigError
from dqnfleet.core.transport import rpc
from dqnfleet.core.transport.security import PLAINTEXT, Security


def fetch(stub, info, dest_root: str | os.PathLike) -> pathlib.Path:
  """Downloads version `info` (a PolicyVersion) over gRPC into dest_root/v..., verified.

  `stub` is a PolicyServiceStub. Raises ValueError if a file arrives
  corrupted; grpc.RpcError if the trainer is unreachable or dropped the version.
  """
  dest_root = pathlib.Path(dest_root)
  dest_root.mkdir(parents=True, exist_ok=True)
  tmp = dest_root / f".fetch-v{info.version:012d}-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  handles = {}
  try:
    for chunk in stub.FetchPolicy(fleet_pb2.FetchPolicyRequest(version=info.version), timeout=300):
      if chunk.file_name not in handles:
        if "/" in chunk.file_name or chunk.file_name.startswith("."):
          raise ValueError(f"refusing policy file name {chunk.file_name!r}")
        handles[chunk.file_name] = open(tmp / chunk.file_name, "wb")
      handles[chunk.file_name].write(chunk.data)
  finally:
    for handle in handles.values():
      handle.close()
  expected = {(f.name, f.size_bytes, f.sha256) for f in info.files}
  got = set(store.file_digests(tmp))
  if got != expected:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ValueError(f"policy v{info.version} arrived incomplete or corrupted")
  final = store.version_dir(dest_root, info.version)
  shutil.rmtree(final, ignore_errors=True)
  os.rename(tmp, final)
  return final


LOAD_ATTEMPTS = 3


def resolve(policy: str, scratch: str, security: Security = PLAINTEXT) -> pathlib.Path:
  """The version directory that `policy` names, fetching it if it is an address."""
  path = pathlib.Path(policy)
  if path.exists():
    for candidate in (path, path / "policies"):
      if (candidate / store.MANIFEST).exists():
        return candidate
      versions = store.list_versions(candidate)
      if versions:
        return store.version_dir(candidate, versions[-1])
    raise ConfigError(
      f"--policy {policy!r} holds no published policy (expected v<step>/ "
      "folders with a manifest.json, or a run directory with policies/)"
    )
  if ":" not in policy:
    raise ConfigError(f"--policy {policy!r} is neither an existing directory nor a host:port")
  with rpc.channel(policy, security) as channel:
    stub = fleet_pb2_grpc.PolicyServiceStub(channel)
    try:
      info = stub.GetLatestPolicy(fleet_pb2.GetLatestPolicyRequest(), timeout=30)
      return fetch(stub, info, scratch)
    except grpc.RpcError as e:
      raise ConfigError(
        f"--policy {policy}: the trainer did not provide a policy ({e.code().name}: {e.details()})"
      ) from None


def load(policy: str, scratch: str, security: Security = PLAINTEXT):
  """The policy that `policy` names, loaded: (path, env_config, env_specs, network, version)."""
  for attempt in range(LOAD_ATTEMPTS):
    path = resolve(policy, scratch, security)
    try:
      return (path, *store.load(path))
    except (tf.errors.NotFoundError, FileNotFoundError):
      # A running trainer pruned the version while we loaded it: take the newest again.
      if attempt == LOAD_ATTEMPTS - 1:
        raise
