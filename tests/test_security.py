"""Listen address, TLS and the bearer token on the project's own gRPC servers.

Certificates are made here, per test session, by a CA of the test's own; the
services are real processes on loopback, the clients the real CLI.
"""

import datetime
import ipaddress
import json
import socket

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import (
  cartpole_collector_args,
  dqnfleet,
  free_port,
  service_args,
  setting_flags,
  wait_until,
)

ENV = {"DQNFLEET_ENV_ID": "CartPole-v1"}


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, sans=()):
  key = ec.generate_private_key(ec.SECP256R1())
  now = datetime.datetime.now(datetime.UTC)
  builder = (
    x509.CertificateBuilder()
    .subject_name(_name(subject))
    .issuer_name(issuer_name or _name(subject))
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + datetime.timedelta(days=1))
    .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
  )
  if sans:
    builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
  cert = builder.sign(issuer_key or key, hashes.SHA256())
  return key, cert


def _write(directory, name, key, cert):
  (directory / f"{name}.key").write_bytes(
    key.private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
  )
  (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  """A CA, a certificate for services on this machine and one from a stranger's CA."""
  directory = tmp_path_factory.mktemp("pki")
  ca_key, ca = _issue("dqnfleet test CA", None, None, ca=True)
  _write(directory, "ca", ca_key, ca)
  local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
  _write(
    directory, "service", *_issue("dqnfleet service", ca_key, ca.subject, ca=False, sans=local)
  )
  stranger_key, stranger_ca = _issue("stranger CA", None, None, ca=True)
  _write(
    directory,
    "stranger",
    *_issue("stranger", stranger_key, stranger_ca.subject, ca=False, sans=local),
  )
  (directory / "token").write_text("s3cret-token\n")
  (directory / "wrong-token").write_text("not-the-token\n")
  return directory


def _tls_flags(pki, who="service", token="token", client_ca=True) -> list[str]:
  return setting_flags(
    tls_cert=pki / f"{who}.pem",
    tls_key=pki / f"{who}.key",
    tls_ca=pki / "ca.pem",
    tls_client_ca=pki / "ca.pem" if client_ca else None,
    auth_token_file=pki / token if token else None,
  )


@pytest.mark.slow
def test_collectors_follow_a_trainer_over_mutual_tls_with_a_token_and_strangers_are_refused(
  services, pki, tmp_path
):
  replay_port, replay_status, trainer_port, collector_port = (free_port() for _ in range(4))
  secure = _tls_flags(pki)
  services(
    "replay",
    *service_args("replay", env_id="CartPole-v1", port=replay_port, status_port=replay_status),
    *secure,
    env=ENV,
  )
  services(
    "trainer",
    *service_args(
      "trainer",
      env_id="CartPole-v1",
      port=trainer_port,
      replay_addresses=(f"localhost:{replay_port}",),
      run_dir=tmp_path / "run",
    ),
    *secure,
    env=ENV,
  )
  services(
    "collector",
    *cartpole_collector_args(replay_port, trainer_port, collector_port),
    *secure,
    env=ENV,
  )
  trainer = f"localhost:{trainer_port}"

  def status(address, *flags):
    return dqnfleet("status", "--json", "--timeout", "5", address, *flags, timeout=60)

  # The collector fetched a published policy over mutual TLS with the token.
  # (-1 until it has loaded one)
  wait_until(
    lambda: (
      json.loads(status(f"localhost:{collector_port}", *secure).stdout)[0]["policy_version"] >= 0
    ),
    180,
    "the collector to load a policy over TLS",
  )
  # Plaintext clients, clients without a certificate, clients whose
  # certificate another CA signed, and clients without the token are refused.
  assert status(trainer).returncode == 1
  without_cert = setting_flags(tls_ca=pki / "ca.pem", auth_token_file=pki / "token")
  assert status(trainer, *without_cert).returncode == 1
  assert status(trainer, *_tls_flags(pki, who="stranger", client_ca=False)).returncode == 1
  no_token = status(trainer, *_tls_flags(pki, token=None))
  assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stdout, no_token.stdout
  wrong = status(trainer, *_tls_flags(pki, token="wrong-token"))
  assert wrong.returncode == 1 and "wrong bearer token" in wrong.stdout, wrong.stdout
  assert status(trainer, *secure).returncode == 0
  # Health stays open to probes, which carry no token (over TLS all the same).
  assert dqnfleet("health", trainer, *_tls_flags(pki, token=None)).returncode == 0


def _an_address_of_this_machine_besides_loopback() -> str | None:
  for addresses in psutil.net_if_addrs().values():
    for address in addresses:
      if address.family == socket.AF_INET and not address.address.startswith("127."):
        return address.address
  return None


def test_a_service_listens_on_the_address_it_is_given(services):
  other = _an_address_of_this_machine_besides_loopback()
  if other is None:
    pytest.skip("this machine has no address besides loopback")
  port, wide_port = free_port(), free_port()
  for listen, p in (("127.0.0.1", port), ("0.0.0.0", wide_port)):
    services(
      f"collector-{p}",
      *service_args(
        "collector",
        env_id="CartPole-v1",
        listen_host=listen,
        status_port=p,
        metrics_port=-1,
        replay_addresses=("localhost:1",),
        trainer_address="localhost:2",
      ),
      env=ENV,
    )
  for p in (port, wide_port):
    wait_until(
      lambda: dqnfleet("health", f"127.0.0.1:{p}").returncode == 0,
      120,
      "the collector to answer on loopback",
    )
  assert dqnfleet("health", f"{other}:{wide_port}").returncode == 0
  assert dqnfleet("health", f"{other}:{port}", "--timeout", "2").returncode == 1


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--tls-cert", "{pki}/service.pem"], "give both or neither"),
    (["--tls-cert", "{pki}/token", "--tls-key", "{pki}/service.key"], "not a PEM certificate"),
    (
      ["--tls-cert", "{pki}/service.pem", "--tls-key", "{pki}/service.pem"],
      "not an unencrypted PEM private key",
    ),
    (["--tls-client-ca", "{pki}/ca.pem"], "which needs TLS"),
    (
      ["--tls-ca", "{pki}/missing.pem"],
      "--tls-ca (DQNFLEET_TLS_CA) {pki}/missing.pem: cannot read",
    ),
    (["--listen-host", "every-interface"], "is not an IP address"),
  ],
)
def test_bad_security_settings_are_refused_naming_the_flag(pki, flags, message):
  flags = [f.format(pki=pki) for f in flags]
  result = dqnfleet("collector", "--env-id", "CartPole-v1", *flags, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message.format(pki=pki) in result.stderr, result.stderr[-2000:]
