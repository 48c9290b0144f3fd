"""The database connection over TLS with sslmode=verify-full, on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import pg_workdir
from ingestd.config import DatabaseConfig
from ingestd.errors import ServiceUnavailable
from ingestd.store import Store
from services import PostgresServer


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("db.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        # Only the IP: a client that connects as "localhost" must fail verify-full.
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[PostgresServer, Path]]:
    with pg_workdir() as workdir:
        yield from _tls_pg(workdir)


def _tls_pg(workdir: Path) -> Iterator[tuple[PostgresServer, Path]]:
    ca_key, ca = make_ca("ingestd test CA")
    cert, key = make_server_cert(ca_key, ca)
    certs = workdir / "certs"
    certs.mkdir()
    (certs / "server.crt").write_bytes(cert)
    (certs / "server.key").write_bytes(key)
    (certs / "server.key").chmod(0o600)
    ca_file = workdir / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    if os.geteuid() == 0:  # the server runs as postgres and must read its own key
        owner = pwd.getpwnam("postgres")
        for path in (certs, certs / "server.crt", certs / "server.key"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        workdir.chmod(0o711)
    settings = {
        "ssl": "on",
        "ssl_cert_file": f"'{certs / 'server.crt'}'",
        "ssl_key_file": f"'{certs / 'server.key'}'",
    }
    with PostgresServer(workdir / "pg", preload=(), settings=settings) as server:
        yield server, ca_file


async def test_verify_full_connects_encrypted(tls_pg: tuple[PostgresServer, Path]) -> None:
    server, ca = tls_pg
    url = f"postgresql://{server.user}@127.0.0.1:{server.port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    async with Store(DatabaseConfig(url=url)) as store, store.connection() as conn:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True


async def test_verify_full_refuses_a_name_the_certificate_does_not_carry(
    tls_pg: tuple[PostgresServer, Path],
) -> None:
    server, ca = tls_pg
    url = f"postgresql://{server.user}@localhost:{server.port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    with pytest.raises(ServiceUnavailable, match="database unreachable"):
        async with Store(DatabaseConfig(url=url, connect_timeout_s=5)):
            pass


async def test_verify_full_refuses_a_server_signed_by_another_ca(
    tls_pg: tuple[PostgresServer, Path], tmp_path: Path
) -> None:
    server, _ = tls_pg
    _, other = make_ca("someone else")
    other_ca = tmp_path / "other.crt"
    other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    url = f"postgresql://{server.user}@127.0.0.1:{server.port}/postgres?sslmode=verify-full&sslrootcert={other_ca}"
    with pytest.raises(ServiceUnavailable, match="certificate"):
        async with Store(DatabaseConfig(url=url, connect_timeout_s=5)):
            pass
