"""Who may reach the project's own gRPC servers: listen address, TLS, bearer token.

Every service has one identity (CommonConfig): the address its servers
listen on, optionally a certificate its servers present (and that it shows
as a client when a server asks for one), the CA it trusts, and a bearer
token. `from_config` reads them once at start into a `Security`, which the
service hands to every server it starts and every channel it opens
(transport/rpc.py); nothing is kept in a module global. Health stays open
(Kubernetes' and compose's probes carry no token); status, policy and summary
calls need the token when one is set.

Reverb's port is outside all of this: dm-reverb 0.14's server has no TLS,
no credentials and no bind option, so in a cluster only a NetworkPolicy or
a service mesh fences it (docs/replay.md).
"""

import dataclasses
import hmac
import ipaddress
import logging
import pathlib

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dqnfleet.core.settings import flags
from dqnfleet.core.settings.config import CommonConfig
from dqnfleet.core.settings.flags import ConfigError

log = logging.getLogger(__name__)
# Probes (kubelet, compose healthchecks) know no token; health says nothing secret.
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


@dataclasses.dataclass(frozen=True)
class Security:
  """One process's listen address, credentials and token; PLAINTEXT has none."""

  listen_host: str = "::"
  server_credentials: grpc.ServerCredentials | None = None
  channel_credentials: grpc.ChannelCredentials | None = None
  token: str | None = None

  def bind_address(self, port: int) -> str:
    host = self.listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

  def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
    return [RequireToken(self.token)] if self.token else []

  def channel(self, address: str, options) -> grpc.Channel:
    """A channel to one of the project's servers, with these credentials and token."""
    if self.channel_credentials:
      ch = grpc.secure_channel(address, self.channel_credentials, options=options)
    else:
      ch = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(ch, _SendToken(self.token)) if self.token else ch


# Every interface, no TLS, no token: the default of the settings, and of tools
# and tests that talk to such servers.
PLAINTEXT = Security()


_FIELDS = {field.name: field for field in dataclasses.fields(CommonConfig)}


def _named(setting: str) -> str:
  """A setting as errors name it: its flag and its environment variable."""
  field = _FIELDS[setting]
  return f"{flags.flag_name(field)} ({flags.env_name(field)})"


def _read(path: str, setting: str, what: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise ConfigError(f"{_named(setting)} {path}: cannot read the {what} ({e.strerror})") from None


def _certificate(path: str, setting: str) -> bytes:
  data = _read(path, setting, "PEM certificate")
  try:
    x509.load_pem_x509_certificates(data)
  except ValueError:
    raise ConfigError(
      f"{_named(setting)} {path}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
    ) from None
  return data


def _private_key(path: str, setting: str) -> bytes:
  data = _read(path, setting, "PEM private key")
  try:
    serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError):
    raise ConfigError(f"{_named(setting)} {path}: not an unencrypted PEM private key") from None
  return data


def check_listen_host(host: str) -> str:
  if host in ("localhost", "") or _is_ip(host):
    return host or "::"
  raise ConfigError(
    f"{_named('listen_host')} {host!r} is not an IP address: use "
    ":: or 0.0.0.0 for every interface, 127.0.0.1 or ::1 for this machine only, "
    "or one of this machine's addresses"
  )


def _is_ip(text: str) -> bool:
  try:
    ipaddress.ip_address(text)
    return True
  except ValueError:
    return False


def from_config(common) -> Security:
  """The Security of CommonConfig `common`; bad or inconsistent settings are a ConfigError."""
  host = check_listen_host(common.listen_host)
  cert = key = client_ca = ca = None
  if bool(common.tls_cert) != bool(common.tls_key):
    raise ConfigError(
      f"{_named('tls_cert')} and {_named('tls_key')} go together: give both or neither"
    )
  if common.tls_cert:
    cert = _certificate(common.tls_cert, "tls_cert")
    key = _private_key(common.tls_key, "tls_key")
  if common.tls_client_ca:
    if not cert:
      raise ConfigError(
        f"{_named('tls_client_ca')} asks clients for certificates, which needs "
        "TLS: give --tls-cert and --tls-key too"
      )
    client_ca = _certificate(common.tls_client_ca, "tls_client_ca")
  if common.tls_ca:
    ca = _certificate(common.tls_ca, "tls_ca")
  token = None
  if common.auth_token_file:
    token = (
      _read(common.auth_token_file, "auth_token_file", "token").decode(errors="replace").strip()
    )
    if not token or any(c.isspace() or not c.isprintable() for c in token):
      raise ConfigError(
        f"{_named('auth_token_file')} {common.auth_token_file}: the token must "
        "be one non-empty line of printable characters without spaces"
      )
  server = (
    grpc.ssl_server_credentials(
      [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    if cert
    else None
  )
  # The same certificate identifies this service as a client, to servers
  # that ask for one (mutual TLS).
  channel = grpc.ssl_channel_credentials(ca, key, cert) if ca else None
  if token and not (server or channel):
    log.warning(
      "a bearer token without TLS crosses the network in clear text; give "
      "--tls-cert/--tls-key (servers) and --tls-ca (clients)"
    )
  return Security(host, server, channel, token)


class RequireToken(grpc.aio.ServerInterceptor):
  """Refuses calls without the bearer token (UNAUTHENTICATED), except health checks."""

  def __init__(self, token: str):
    self._expected = f"Bearer {token}".encode()

  async def intercept_service(self, continuation, details):
    handler = await continuation(details)
    if handler is None or details.method.startswith(OPEN_METHODS_PREFIX):
      return handler
    given = dict(details.invocation_metadata or ()).get("authorization", "")
    if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
      return handler
    return _refusal(handler, "missing bearer token" if not given else "wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
  async def refuse(request, context):
    await context.abort(
      grpc.StatusCode.UNAUTHENTICATED,
      f"{reason}: this server needs the token of its --auth-token-file",
    )

  kind = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
  }[(handler.request_streaming, handler.response_streaming)]
  return kind(
    refuse,
    request_deserializer=handler.request_deserializer,
    response_serializer=handler.response_serializer,
  )


class _SendToken(
  grpc.UnaryUnaryClientInterceptor,
  grpc.UnaryStreamClientInterceptor,
  grpc.StreamUnaryClientInterceptor,
  grpc.StreamStreamClientInterceptor,
):
  """Adds `authorization: Bearer <token>` to every call of a channel."""

  def __init__(self, token: str):
    self._header = ("authorization", f"Bearer {token}")

  def _with_token(self, details):
    return details._replace(metadata=[*(details.metadata or ()), self._header])

  def intercept_unary_unary(self, continuation, details, request):
    return continuation(self._with_token(details), request)

  def intercept_unary_stream(self, continuation, details, request):
    return continuation(self._with_token(details), request)

  def intercept_stream_unary(self, continuation, details, requests):
    return continuation(self._with_token(details), requests)

  def intercept_stream_stream(self, continuation, details, requests):
    return continuation(self._with_token(details), requests)
