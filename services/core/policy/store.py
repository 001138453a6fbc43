"""Published policies on disk: versioned, written atomically, pruned.

    <run_dir>/policies/
      v000000001000/            version = the trainer's train step
        manifest.json           env and network settings needed to rebuild the net
        weights.index           TF checkpoint of the Q-network's variables
        weights.data-00000-of-00001

A version is written into a hidden temporary directory and renamed into place,
so a reader (the trainer's PolicyService, `evaluate`) never sees a half-written
one. Collectors receive the same files over gRPC (policy/client.py) and keep
their own copy.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import time

import tensorflow as tf

from dqnfleet.core.rl import networks, specs
from dqnfleet.core.rl.priorities import TdTarget
from dqnfleet.core.settings.config import EnvConfig, NetworkConfig, is_atari

FORMAT = "dqnfleet-policy-v1"
MANIFEST = "manifest.json"
WEIGHTS_PREFIX = "weights"
_VERSION_DIR = re.compile(r"^v(\d{12})$")


def version_dir(policies_dir: str | os.PathLike, version: int) -> pathlib.Path:
  return pathlib.Path(policies_dir) / f"v{version:012d}"


def list_versions(policies_dir: str | os.PathLike) -> list[int]:
  """Complete versions in `policies_dir`, oldest first."""
  root = pathlib.Path(policies_dir)
  if not root.is_dir():
    return []
  found = (_VERSION_DIR.match(p.name) for p in root.iterdir())
  return sorted(int(m.group(1)) for m in found if m)


def publish(
  policies_dir: str | os.PathLike,
  version: int,
  network: tf.keras.Model,
  env: EnvConfig,
  net: NetworkConfig,
  keep: int,
  td_target: TdTarget | None = None,
) -> pathlib.Path:
  """Writes `network`'s weights as `version` atomically; keeps the newest `keep`.

  `td_target`: the trainer's TD target settings, from which collectors compute
  the initial priorities of what they write (core/rl/priorities.py).
  """
  root = pathlib.Path(policies_dir)
  root.mkdir(parents=True, exist_ok=True)
  final = version_dir(root, version)
  tmp = root / f".tmp-{final.name}-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    tf.train.Checkpoint(q_network=network).write(str(tmp / WEIGHTS_PREFIX))
    # The manifest lists its siblings' sizes and digests, so a version damaged
    # on disk later (a crash mid-write, a full disk) is caught before it is served.
    manifest = {
      "format": FORMAT,
      "version": version,
      "published_unix_ms": int(time.time() * 1000),
      "env": dataclasses.asdict(env),
      "network": dataclasses.asdict(net),
      "observation_shape": list(network.input_tensor_spec.shape),
      **({"td_target": dataclasses.asdict(td_target)} if td_target else {}),
      "files": {name: {"size": size, "sha256": digest} for name, size, digest in file_digests(tmp)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for path in tmp.iterdir():
      with open(path, "rb") as f:
        os.fsync(f.fileno())
  except BaseException:  # a full disk: nothing half-written stays behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if final.exists():  # republishing the same step (e.g. after a restart)
    shutil.rmtree(final)
  os.rename(tmp, final)
  for old in list_versions(root)[:-keep]:
    # Rename first so no reader ever lists a half-deleted version.
    doomed = root / f".del-v{old:012d}-{os.getpid()}"
    os.rename(version_dir(root, old), doomed)
    shutil.rmtree(doomed, ignore_errors=True)
  return final


def read_manifest(path: str | os.PathLike) -> dict:
  path = pathlib.Path(path)
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a published dqnfleet policy ({e})") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown policy format {manifest.get('format')!r}, expected {FORMAT}")
  return manifest


class Damaged(ValueError):
  """A version's files do not match its manifest."""


def read_verified(path: str | os.PathLike) -> list[tuple[str, bytes]]:
  """(name, bytes) of every file of a version, sorted by name, checked against its manifest.

  Raises FileNotFoundError if the version is not there, Damaged if its files
  do not match what its manifest lists.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(path)
  files = [(file.name, file.read_bytes()) for file in sorted(path.iterdir())]
  try:
    manifest = json.loads(dict(files)[MANIFEST])
  except (KeyError, ValueError) as e:
    raise Damaged(f"{path}: no readable {MANIFEST} ({e})") from None
  listed = manifest.get("files", {})  # empty: published before manifests listed their files
  present = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in files}
  for name, expected in listed.items():
    if name not in present:
      raise Damaged(f"{path / name} is missing")
    if present[name] != (expected["size"], expected["sha256"]):
      raise Damaged(
        f"{path / name} does not match the manifest ({present[name][0]} bytes, "
        f"expected {expected['size']})"
      )
  return files


def damage(path: str | os.PathLike) -> str | None:
  """What is wrong with a version on disk (None if its files match its manifest)."""
  try:
    read_manifest(path)
    read_verified(path)
  except (OSError, ValueError) as e:  # Damaged is a ValueError
    return str(e)
  return None


def newest_intact(policies_dir: str | os.PathLike, log) -> int | None:
  """The newest version whose files match its manifest; damaged newer ones are moved aside.

  A moved-aside version (`.damaged-v...`) is never listed or served again,
  and stays on disk for whoever wants to look at it.
  """
  for version in reversed(list_versions(policies_dir)):
    path = version_dir(policies_dir, version)
    problem = damage(path)
    if problem is None:
      return version
    aside = path.with_name(f".damaged-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    log.warning(
      "published policy v%d is damaged (%s): moved aside to %s, not served", version, problem, aside
    )
  return None


def file_digests(path: str | os.PathLike) -> list[tuple[str, int, str]]:
  """(name, size, sha256) of every file of a version, sorted by name."""
  out = []
  for file in sorted(pathlib.Path(path).iterdir()):
    out.append((file.name, file.stat().st_size, hashlib.sha256(file.read_bytes()).hexdigest()))
  return out


def configs_of(manifest: dict) -> tuple[EnvConfig, NetworkConfig]:
  """The settings that rebuild a version's network; ValueError if this code cannot."""
  if "observation_shape" not in manifest and is_atari(manifest["env"]["env_id"]):
    raise ValueError(
      f"policy v{manifest['version']} was published by a dqnfleet whose Atari network read "
      "observations with their frames stacked last ([84, 84, 4]); this one reads them stacked "
      "first ([4, 84, 84]), so its weights do not fit: evaluate or export it with the dqnfleet "
      "that trained it, or train a new run"
    )
  net = dict(manifest["network"])
  net["fc_layers"] = tuple(net["fc_layers"])
  return EnvConfig(**manifest["env"]), NetworkConfig(**net)


def td_target_of(manifest: dict) -> TdTarget | None:
  """The trainer's TD target settings, if the version was published with them."""
  return TdTarget(**manifest["td_target"]) if "td_target" in manifest else None


def restore_weights(network: tf.keras.Model, path: str | os.PathLike) -> None:
  tf.train.Checkpoint(q_network=network).read(
    str(pathlib.Path(path) / WEIGHTS_PREFIX)
  ).assert_existing_objects_matched()


def load(path: str | os.PathLike):
  """Rebuilds the published network: returns (env config, specs, network, version)."""
  manifest = read_manifest(path)
  env, net = configs_of(manifest)
  env_specs = specs.env_specs(env)
  network = networks.q_net(env_specs, net)
  restore_weights(network, path)
  return env, env_specs, network, manifest["version"]
