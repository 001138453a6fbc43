"""Settings as dataclass fields, exposed as flags and environment variables.

Each field declared with `setting()` becomes a `--field-name` flag and a
`DQNFLEET_FIELD_NAME` environment variable (the same names in docker compose
and Kubernetes), and is a key of the TOML file that `--config FILE` names. A
value is taken from, in order: the flag, the environment variable, the config
file, the environment family's default (`classic=` for classic-control ids
such as CartPole-v1, whose defaults differ from Atari's), the default.

A config file holds settings as top-level keys (`env_id = "ALE/Pong-v5"`),
which apply to every command that has the setting, and tables named after a
command (`[trainer]`, `[replay]`, ...) whose keys apply to that command only
and win over top-level ones; see `read_config_file`.

Invalid values are refused with `ConfigError`, whose message names the setting
and what is allowed, before any service starts.
"""

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Callable, Sequence
from typing import Any

ENV_PREFIX = "DQNFLEET_"
_UNSET = object()
# Settings that were renamed: an old name is refused with the new one (a
# variable or config key silently ignored would run with the default).
# argparse still takes an old flag that is a prefix of its new name.
RENAMED = {"replay_address": "replay_addresses"}


class ConfigError(ValueError):
  """A setting has a value that is not allowed; the message says which and why."""


def setting(
  default: Any,
  help: str,
  *,
  minimum: float | None = None,
  maximum: float | None = None,
  choices: Sequence[Any] | None = None,
  classic: Any = _UNSET,
  address: bool = False,
) -> Any:
  """Declares one setting: default, help text, allowed values, family default.

  `address`: the value is a host:port to connect to.
  """
  metadata = {
    "help": help,
    "minimum": minimum,
    "maximum": maximum,
    "choices": tuple(choices) if choices else None,
    "classic": classic,
    "address": address,
  }
  if isinstance(default, (list, tuple)):
    return dataclasses.field(default_factory=lambda: tuple(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
  return "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field) -> str:
  return ENV_PREFIX + field.name.upper()


def _field_type(cls: type, field: dataclasses.Field) -> Any:
  return typing.get_type_hints(cls)[field.name]


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ("1", "true", "yes", "on"):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"{text!r} is not a boolean (use true/false)")


def _converter(kind: Any) -> Callable[[str], Any]:
  if kind is bool:
    return _parse_bool
  if kind in (int, float, str):
    return kind
  if typing.get_origin(kind) is tuple:
    item = typing.get_args(kind)[0]
    return lambda text: tuple(item(part) for part in text.split(",") if part.strip())
  raise TypeError(f"unsupported setting type {kind}")


def _describe_default(field: dataclasses.Field) -> str:
  def show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

  default = field.default_factory() if field.default is dataclasses.MISSING else field.default
  text = f"default {show(default)!s}" if default not in ("", None) else "default unset"
  classic = field.metadata["classic"]
  if classic is not _UNSET:
    text += f"; classic control: {show(classic)}"
  return text


def add_flags(
  parser: argparse.ArgumentParser, *config_classes: type, exclude: frozenset[str] = frozenset()
) -> None:
  """Adds one flag per setting of each dataclass (but `exclude`), grouped by class."""
  for cls in config_classes:
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for field in dataclasses.fields(cls):
      if field.name in exclude:
        continue
      kind = _field_type(cls, field)
      meta = field.metadata
      help_text = f"{meta['help']} ({_describe_default(field)}; env {env_name(field)})"
      if meta["choices"]:
        help_text += f" One of: {', '.join(map(str, meta['choices']))}."
      if kind is bool:
        group.add_argument(
          flag_name(field),
          dest=field.name,
          default=_UNSET,
          action=argparse.BooleanOptionalAction,
          help=help_text,
        )
      else:
        group.add_argument(
          flag_name(field),
          dest=field.name,
          default=_UNSET,
          type=str,
          metavar=field.name.upper(),
          help=help_text,
        )


def build(
  cls: type,
  args: argparse.Namespace | None = None,
  environ: dict[str, str] | None = None,
  *,
  classic_control: bool = False,
  file_values: dict[str, tuple[Any, str]] | None = None,
) -> Any:
  """Builds a config of `cls` from flags, environment variables, a config file and defaults.

  `file_values` maps setting names to (value, where it was read) from
  `config_file_values`.
  """
  environ = os.environ if environ is None else environ
  file_values = file_values or {}
  names = {field.name for field in dataclasses.fields(cls)}
  for old, new in RENAMED.items():
    if new in names and environ.get(ENV_PREFIX + old.upper(), "") != "":
      raise ConfigError(
        f"{ENV_PREFIX + old.upper()} was renamed {ENV_PREFIX + new.upper()} "
        "(a comma-separated list); set that instead"
      )
  values = {}
  for field in dataclasses.fields(cls):
    kind = _field_type(cls, field)
    convert = _converter(kind)
    raw = getattr(args, field.name, _UNSET) if args is not None else _UNSET
    source = flag_name(field)
    # An empty variable counts as unset, so compose files can pass through
    # `${DQNFLEET_X:-}` for every setting without overriding the defaults.
    if raw is _UNSET and environ.get(env_name(field), "") != "":
      raw, source = environ[env_name(field)], env_name(field)
    if raw is _UNSET and field.name in file_values:
      raw, source = file_values[field.name]
      raw = _from_toml(raw, kind, source)
    if raw is _UNSET:
      if classic_control and field.metadata["classic"] is not _UNSET:
        values[field.name] = field.metadata["classic"]
      continue
    if isinstance(raw, str) and kind is not str:
      try:
        raw = convert(raw)
      except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {_type_word(kind)}") from None
    values[field.name] = raw
  config = cls(**values)
  check_bounds(config)
  return config


def _from_toml(value: Any, kind: Any, source: str) -> Any:
  """A TOML value as the setting's type; strings go through the flag's converter."""
  if isinstance(value, str):
    return value
  if typing.get_origin(kind) is tuple and isinstance(value, list):
    item = typing.get_args(kind)[0]
    if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
      return tuple(value)
  elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
    return value
  raise ConfigError(f"{source} = {value!r} is not a valid {_type_word(kind)}")


def read_config_file(path: str) -> dict[str, Any]:
  """The TOML document at `path`; a missing or malformed file is a ConfigError."""
  try:
    with open(path, "rb") as f:
      return tomllib.load(f)
  except FileNotFoundError:
    raise ConfigError(f"--config {path!r}: no such file") from None
  except (OSError, tomllib.TOMLDecodeError) as e:
    raise ConfigError(f"--config {path!r} is not a readable TOML file: {e}") from None


def check_config_file(doc: dict[str, Any], path: str, known: set[str], commands: set[str]) -> None:
  """Refuses keys that are no setting of any command and tables that are no command.

  A misspelt key would otherwise be silently ignored.
  """
  for key, value in doc.items():
    if isinstance(value, dict):
      if key not in commands:
        raise ConfigError(
          f"--config {path!r}: [{key}] is not a command; tables may be "
          f"{', '.join(sorted(commands))}"
        )
      for sub in value:
        if isinstance(value[sub], dict) or sub not in known:
          raise ConfigError(
            f"--config {path!r}: [{key}] {sub} is not a setting (settings "
            "are the flags' names with underscores, e.g. env_id)"
          )
    elif key in RENAMED:
      raise ConfigError(f"--config {path!r}: {key} was renamed {RENAMED[key]}; use that")
    elif key not in known:
      raise ConfigError(
        f"--config {path!r}: {key} is not a setting (settings are the flags' "
        "names with underscores, e.g. env_id)"
      )


def config_file_values(
  doc: dict[str, Any], path: str, tables: Sequence[str]
) -> dict[str, tuple[Any, str]]:
  """Settings of a checked `doc` that apply: top-level keys, then each of `tables` in order."""
  values = {
    key: (value, f"{key} in {path}") for key, value in doc.items() if not isinstance(value, dict)
  }
  for table in tables:
    for key, value in doc.get(table, {}).items():
      values[key] = (value, f"[{table}] {key} in {path}")
  return values


def all_setting_names(config_classes: Sequence[type]) -> set[str]:
  return {f.name for cls in config_classes for f in dataclasses.fields(cls)}


def _type_word(kind: Any) -> str:
  if typing.get_origin(kind) is tuple:
    return f"comma-separated list of {typing.get_args(kind)[0].__name__}"
  return {bool: "boolean (true/false)", int: "integer", float: "number", str: "string"}[kind]


def check_bounds(config: Any) -> None:
  """Refuses values outside a setting's declared minimum, maximum or choices.

  Also refuses NaN and infinities (NaN passes every comparison) and
  addresses that do not parse. Messages name the flag and its variable.
  """
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    meta = field.metadata
    where = f" (flag {flag_name(field)}, env {env_name(field)})"
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{flag_name(field)} must be a finite number, got {value}{where}")
      if meta["minimum"] is not None and item < meta["minimum"]:
        raise ConfigError(f"{flag_name(field)} must be >= {meta['minimum']}, got {value}{where}")
      if meta["maximum"] is not None and item > meta["maximum"]:
        raise ConfigError(f"{flag_name(field)} must be <= {meta['maximum']}, got {value}{where}")
      if meta["choices"] and item not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{flag_name(field)} must be one of {allowed}, got {value!r}{where}")
    if meta.get("address"):
      if isinstance(value, tuple) and not value:
        raise ConfigError(f"{flag_name(field)} needs at least one host:port{where}")
      for item in items:
        problem = address_problem(item)
        if problem:
          raise ConfigError(f"{flag_name(field)} {item!r} {problem}{where}")


def address_problem(address: str) -> str | None:
  """Why `address` is not a host:port to connect to (None if it is)."""
  host, sep, port = address.rpartition(":")
  if not sep or not host:
    return "is not host:port (e.g. localhost:8000 or [::1]:8000)"
  if host.startswith("["):
    if not host.endswith("]") or len(host) < 3:
      return "has an IPv6 host without its closing ] (write [::1]:8000)"
  elif not all(c.isalnum() or c in "-._" for c in host):
    return f"has a host {host!r} with characters a host name cannot have"
  if not port.isdigit() or not 1 <= int(port) <= 65535:
    return f"has port {port!r}; a port is 1..65535"
  return None


def to_flags(config: Any) -> list[str]:
  """The flags that reproduce `config` (for launching a service as a process)."""
  out = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(value, bool):
      out.append(flag_name(field) if value else "--no-" + flag_name(field)[2:])
    elif isinstance(value, tuple):
      out.append(f"{flag_name(field)}={','.join(map(str, value))}")
    else:
      out.append(f"{flag_name(field)}={value}")
  return out
