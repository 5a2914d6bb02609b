"""Issue #13 item 7b: optional TLS, and mutual TLS, on the services' gRPC servers and clients.

Certificates are made here with `cryptography`: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, and a second CA that nobody trusts. Checked:

- a server started with `server.tls_cert_file`/`tls_key_file` answers health over TLS to a
  client trusting the CA, and refuses plaintext and clients trusting another CA;
- with `server.tls_client_ca_file` (mutual TLS) it refuses a client with no certificate, or
  one signed by another CA, and serves one with the CA's;
- the coordinator's scoring client opens its channel from the same config (TLS or not);
- `freemask serve` and `freemask health` as processes: a TLS service is SERVING to the probe
  configured for TLS, and not to a plaintext one.

No broker, store or Triton is needed: the service under test has nothing to consume (its bus
is a closed port), and health is answered by the gRPC server alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freemask.coordinator.rounds import Train
from freemask.coordinator.service import ScoringClient
from freemask.shared.config import ServerConfig
from freemask.shared.errors import Unavailable
from freemask.shared.grpc_runtime import TlsFileError, check_health, open_channel, start_server
from freemask.shared.metrics import ServiceMetrics

from ports import reserve_ports
from service_procs import base_env, spawn_service, wait_healthy


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem.key.chmod(0o600)
    return pem


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


@dataclass(frozen=True)
class Authority:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    pem: Pem

    @classmethod
    def create(cls, directory: Path, common_name: str) -> Authority:
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (_builder(common_name, name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(name, key, _write(directory, common_name, cert, key))

    def issue(self, directory: Path, common_name: str, usage: x509.ObjectIdentifier) -> Pem:
        key = _key()
        builder = _builder(common_name, self.name, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(directory, common_name, builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from a CA the servers do not trust
    stranger_ca: Authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority.create(directory, "freemask-test-ca")
    stranger_ca = Authority.create(directory, "stranger-ca")
    return Pki(ca, ca.issue(directory, "freemask-server", ExtendedKeyUsageOID.SERVER_AUTH),
               ca.issue(directory, "freemask-client", ExtendedKeyUsageOID.CLIENT_AUTH),
               stranger_ca.issue(directory, "stranger-client", ExtendedKeyUsageOID.CLIENT_AUTH), stranger_ca)


def server_config(pki: Pki, mutual: bool) -> ServerConfig:
    return ServerConfig(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key,
                        tls_client_ca_file=pki.ca.pem.cert if mutual else None, tls_ca_file=pki.ca.pem.cert,
                        tls_client_cert_file=pki.client.cert if mutual else None,
                        tls_client_key_file=pki.client.key if mutual else None)


def client(ca: Path | None = None, cert: Pem | None = None) -> ServerConfig:
    """The client half of a config: whom it trusts, and the certificate it shows."""
    return ServerConfig(tls_ca_file=ca, tls_client_cert_file=cert.cert if cert else None,
                        tls_client_key_file=cert.key if cert else None)


def health_code(target: str, config: ServerConfig | None) -> grpc.StatusCode:
    """OK, or the status a client with `config` gets from health."""
    with open_channel(target, config) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(120)
def test_a_tls_server_serves_tls_clients_that_trust_its_ca_only(pki: Pki) -> None:
    running = start_server(server_config(pki, mutual=False), 0, [], ServiceMetrics("tls"))
    target = f"127.0.0.1:{running.port}"
    try:
        assert check_health(target, server=client(pki.ca.pem.cert))
        assert health_code(target, client(pki.ca.pem.cert)) == grpc.StatusCode.OK
        assert not check_health(target)  # plaintext
        assert health_code(target, None) == grpc.StatusCode.UNAVAILABLE
        assert health_code(target, client(pki.stranger_ca.pem.cert)) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0.5)


@pytest.mark.timeout(120)
def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(pki: Pki) -> None:
    running = start_server(server_config(pki, mutual=True), 0, [], ServiceMetrics("mtls"))
    target = f"127.0.0.1:{running.port}"
    try:
        assert health_code(target, client(pki.ca.pem.cert, pki.client)) == grpc.StatusCode.OK
        assert health_code(target, client(pki.ca.pem.cert)) == grpc.StatusCode.UNAVAILABLE  # no certificate
        assert health_code(target, client(pki.ca.pem.cert, pki.stranger)) == grpc.StatusCode.UNAVAILABLE
        assert health_code(target, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0.5)


@pytest.mark.timeout(120)
def test_the_coordinators_scoring_client_uses_the_configured_tls(pki: Pki) -> None:
    """Through TLS the call reaches the server (which has no Scoring service: UNIMPLEMENTED); in
    plaintext it never gets there."""
    running = start_server(server_config(pki, mutual=True), 0, [], ServiceMetrics("mtls"))
    target = f"127.0.0.1:{running.port}"
    train = Train(round=0, manifest_key="runs/r/rounds/0/manifest.jsonl", pairs=(), init_from=None)
    try:
        for config, reached in ((server_config(pki, mutual=True), True), (None, False)):
            scoring = ScoringClient(target, timeout_s=5, server=config)
            try:
                with pytest.raises(Unavailable) as info:
                    scoring.train("run-1", train, epochs=1, seed=0)
            finally:
                scoring.close()
            assert ("UNIMPLEMENTED" in str(info.value)) == reached, str(info.value)
    finally:
        running.stop(0.5)


def test_an_unreadable_certificate_stops_the_server_with_the_setting_named(tmp_path: Path, pki: Pki) -> None:
    config = ServerConfig(tls_cert_file=tmp_path / "missing.crt", tls_key_file=pki.server.key,
                          tls_ca_file=pki.ca.pem.cert)
    with pytest.raises(TlsFileError, match=r"server\.tls_cert_file: cannot read .*missing\.crt"):
        start_server(config, 0, [], ServiceMetrics("tls"))


def tls_env(pki: Pki) -> dict[str, str]:
    return {"FREEMASK_SERVER__TLS_CERT_FILE": str(pki.server.cert),
            "FREEMASK_SERVER__TLS_KEY_FILE": str(pki.server.key),
            "FREEMASK_SERVER__TLS_CLIENT_CA_FILE": str(pki.ca.pem.cert),
            "FREEMASK_SERVER__TLS_CA_FILE": str(pki.ca.pem.cert),
            "FREEMASK_SERVER__TLS_CLIENT_CERT_FILE": str(pki.client.cert),
            "FREEMASK_SERVER__TLS_CLIENT_KEY_FILE": str(pki.client.key)}


def probe(service: str, target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "freemask.shared.cli", "health", service, "--target", target,
                           "--timeout", "3"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_freemask_serve_and_health_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    (closed,) = reserve_ports(1)
    env = base_env({"FREEMASK_BUS__BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
                    "FREEMASK_STORE__ENDPOINT": f"127.0.0.1:{closed}", "FREEMASK_STORE__ACCESS_KEY": "unused",
                    "FREEMASK_STORE__SECRET_KEY": "unused-too", **tls_env(pki)})
    service = spawn_service("placement", env, tmp_path / "logs")
    try:
        wait_healthy([service], server=server_config(pki, mutual=True))
        served = probe("placement", service.target, env)
        assert served.returncode == 0 and "SERVING" in served.stdout, served.stdout + served.stderr
        plaintext = probe("placement", service.target, base_env({}))
        assert plaintext.returncode == 1, plaintext.stdout + plaintext.stderr
        # trusts the CA, shows no certificate
        refused = probe("placement", service.target,
                        base_env({"FREEMASK_SERVER__TLS_CA_FILE": str(pki.ca.pem.cert)}))
        assert refused.returncode == 1, refused.stdout + refused.stderr
    finally:
        # Not SIGTERM: with its broker a closed port the worker sits in kafka-python's bootstrap
        # (about 30 s), and the graceful exit waits for it; that is not what this test is about.
        service.kill()
