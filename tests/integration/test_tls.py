"""TLS at the local stack's PgBouncer: verify-full succeeds with the right CA and host name and
fails closed with a wrong CA, a wrong host name, or no TLS at all."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import psycopg
import pytest
from cryptography import x509

from recsys.config import forget_settings
from recsys.db.pool import close_pools, get_pool
from recsys.http.health import health_get
from recsys.local.certs import write_ca, write_tls_files
from recsys.local.stack import Stack, StackConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(StackConfig.ephemeral(Path(tmp_path_factory.mktemp("tls-stack")), tls=True))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the stack's certificate."""
    folder = Path(tmp_path_factory.mktemp("other-ca"))
    write_ca(folder / "ca.pem", folder / "ca.key", common_name="someone else's CA")
    return folder / "ca.pem"


def connect(stack: Stack, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(stack.bouncer_url(user="recsys_query"), prepare_threshold=None, connect_timeout=3,
                           **kwargs)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_with_the_stack_ca(tls_stack: Stack, host: str) -> None:
    with connect(tls_stack, host=host, sslmode="verify-full", sslrootcert=str(tls_stack.tls_files.ca_cert)) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("recsys_query",)


def test_a_wrong_ca_is_refused(tls_stack: Stack, other_ca: Path) -> None:
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(tls_stack, sslmode="verify-full", sslrootcert=str(other_ca))


def test_a_wrong_host_name_is_refused(tls_stack: Stack) -> None:
    # Same server and CA, but the client expects another name than the certificate's.
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        connect(tls_stack, host="db.example.org", hostaddr="127.0.0.1", sslmode="verify-full",
                sslrootcert=str(tls_stack.tls_files.ca_cert))


def test_a_server_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    # A PgBouncer whose certificate (from a CA the client trusts) names another host.
    root = tmp_path / "stack"
    files = write_tls_files(root / "tls", names=["db.example.org"])
    stack = Stack(StackConfig.ephemeral(root, tls=True))
    try:
        stack.up(migrate=False)
        assert stack.tls_files == files
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(psycopg.OperationalError, match="does not match host name"):
                psycopg.connect(stack.bouncer_url(), host=host, sslmode="verify-full",
                                sslrootcert=str(files.ca_cert), connect_timeout=3)
        # The same server is fine for a client that asks for the name on the certificate.
        with psycopg.connect(stack.bouncer_url(), host="db.example.org", hostaddr="127.0.0.1",
                             sslmode="verify-full", sslrootcert=str(files.ca_cert), connect_timeout=3) as conn:
            assert conn.info.pgconn.ssl_in_use
    finally:
        stack.down()


def test_the_stack_certificate_names_localhost_and_the_loopback_address(tls_stack: Stack) -> None:
    cert = x509.load_pem_x509_certificate(tls_stack.tls_files.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert tls_stack.tls_files.ca_key.stat().st_mode & 0o077 == 0


def test_plaintext_clients_are_refused(tls_stack: Stack) -> None:
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        connect(tls_stack, sslmode="disable")


@pytest.fixture
async def tls_env(tls_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, str]]:
    env = {**tls_stack.app_environment(), "RECSYS_POOL_TIMEOUT": "2", "RECSYS_CONNECT_TIMEOUT": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    forget_settings()
    yield env
    await close_pools()
    forget_settings()


async def health() -> tuple[int, dict[str, Any]]:
    response = await health_get(func.HttpRequest("GET", "http://localhost/api/health", body=b""))
    return response.status_code, json.loads(response.get_body())


async def test_the_app_environment_of_a_tls_stack_verifies_the_server(tls_env: dict[str, str]) -> None:
    assert tls_env["RECSYS_SSLMODE"] == "verify-full"
    assert (await health())[0] == 200
    for purpose in ("query", "loader"):
        async with (await get_pool(purpose)).connection() as conn:
            assert conn.info.pgconn.ssl_in_use


async def test_the_pool_fails_closed_with_a_wrong_ca(
    tls_env: dict[str, str], other_ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_SSLROOTCERT", str(other_ca))
    forget_settings()
    status, body = await health()
    assert status == 503 and body["database"] == "unreachable"
