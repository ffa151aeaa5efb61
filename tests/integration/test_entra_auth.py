"""Entra ID mode end to end, with the real azure-identity library.

A local stand-in for the managed identity endpoint that Azure Functions provides (App Service
protocol: ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER``) issues short-lived tokens and makes each
the password of the principal's role on a PostgreSQL that verifies SCRAM passwords. The pool
reaches it as the functions do in Azure: through PgBouncer (transaction mode) over TLS with
``verify-full``. PgBouncer has no list of these passwords: it looks each login up with
``auth_query`` and passes the SCRAM keys through to PostgreSQL, so rotating passwords work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func
import psycopg
import pytest
from identity_endpoint import ManagedIdentityEndpoint
from psycopg import sql
from psycopg_pool import PoolTimeout

from recsys.config import Settings, forget_settings, load_settings
from recsys.db.credentials import ENTRA_SCOPE
from recsys.db.pool import close_pools, get_pool
from recsys.http.health import health_get
from recsys.local.stack import Stack, StackConfig

pytestmark = pytest.mark.integration

PRINCIPAL = "recsys-func-query"  # as pgaadauth_create_principal names a managed identity's role
CLIENT_ID = "6f1d3c2a-0b7e-4e59-9a55-3c1f0e2d4b11"
RESOURCE = ENTRA_SCOPE.removesuffix("/.default")
TOKEN_LIFETIME = 4  # seconds: each connection lives about three, so rotations come quickly


@dataclass
class IdentityEndpoint:
    """The managed identity endpoint of App Service / Azure Functions, for one principal."""

    admin_conninfo: str
    role: str
    client_id: str
    header: str = field(default_factory=lambda: secrets.token_hex(16))
    lifetime: int = TOKEN_LIFETIME
    #: ``ok``; ``invalid`` (a token the database does not accept); ``expired`` (already expired);
    #: ``error`` (the endpoint refuses); ``hang`` (the endpoint does not answer).
    mode: str = "ok"
    requests: int = 0
    #: token fingerprint -> expires_on, of every token the database accepted.
    issued: dict[str, float] = field(default_factory=dict)
    #: every token handed out, to look for in the logs.
    tokens: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests += 1
            if self.mode == "error":
                # App Service's error shape.
                return 400, {"statusCode": 400, "message": "identity not found for client id"}
            if self.mode == "hang":
                self.release.wait(10)
                return 500, {"statusCode": 500, "message": "released"}
            token = secrets.token_urlsafe(48)
            expires_on = math.ceil(time.time()) + self.lifetime
            if self.mode == "expired":
                expires_on = int(time.time()) - 60
            self.tokens.append(token)
            if self.mode == "ok":
                with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
                    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(self.role), sql.Literal(token)))
                self.issued[fingerprint(token)] = expires_on
            return 200, {"access_token": token, "expires_on": str(expires_on), "resource": RESOURCE,
                         "token_type": "Bearer", "client_id": self.client_id}

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Yields the endpoint URL; a hanging request is released before the server stops."""
        served = ManagedIdentityEndpoint(RESOURCE, self.client_id, self.issue, header=self.header)
        with served.serving() as url:
            try:
                yield url
            finally:
                self.release.set()


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def entra_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own: TLS at PgBouncer, and auth_query for logins not in its auth file."""
    config = StackConfig.ephemeral(
        Path(tmp_path_factory.mktemp("entra-stack")),
        tls=True,
        bouncer_settings={
            "auth_user": "postgres",
            "auth_query": "SELECT usename, passwd FROM pg_shadow WHERE usename = $1",
        },
    )
    stack = Stack(config)
    try:
        stack.up()
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            # What the README has the Azure administrator do for the functions' managed identity.
            principal = sql.Identifier(PRINCIPAL)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(principal))
            conn.execute(sql.SQL("GRANT recsys_query TO {}").format(principal))
            conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(principal))
        yield stack
    finally:
        stack.down()


@pytest.fixture
def endpoint(entra_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[IdentityEndpoint]:
    stand_in = IdentityEndpoint(entra_stack.admin_conninfo(), PRINCIPAL, CLIENT_ID)
    with stand_in.serving() as url:
        monkeypatch.setenv("IDENTITY_ENDPOINT", url)
        monkeypatch.setenv("IDENTITY_HEADER", stand_in.header)
        yield stand_in


@pytest.fixture
def entra_env(entra_stack: Stack, endpoint: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The app settings of Entra mode: no password anywhere, TLS verify-full."""
    c = entra_stack.config
    env = {
        "RECSYS_DB_AUTH": "entra",
        "RECSYS_DATABASE_URL": f"postgresql://{PRINCIPAL}@localhost:{c.bouncer_port}/{c.database}",
        "RECSYS_ENTRA_CLIENT_ID": CLIENT_ID,
        "RECSYS_SSLMODE": "verify-full",
        "RECSYS_SSLROOTCERT": str(entra_stack.tls_files.ca_cert),
        "RECSYS_EMBEDDING_DIM": str(c.embedding_dim),
        "RECSYS_POOL_MIN_SIZE": "1",
        "RECSYS_POOL_MAX_SIZE": "4",
        "RECSYS_POOL_TIMEOUT": "3",
        "RECSYS_CONNECT_TIMEOUT": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    forget_settings()
    return env


@pytest.fixture
async def entra_settings(entra_env: dict[str, str]) -> AsyncIterator[Settings]:
    yield load_settings(entra_env)
    await close_pools()
    forget_settings()


async def test_tokens_rotate_under_continuous_requests(
    entra_settings: Settings, endpoint: IdentityEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = await get_pool("query", entra_settings)
    uses: list[tuple[str, float]] = []  # (token fingerprint, when the connection was used)
    served = 0

    async def client() -> None:
        nonlocal served
        # At least three rotations: a fourth token, plus a round of requests with it.
        while len(endpoint.issued) < 5:
            async with pool.connection() as conn:
                used_at = time.time()
                row = await (await conn.execute("SELECT current_user, count(*) FROM items")).fetchone()
                assert row is not None and row[0] == PRINCIPAL
                uses.append((fingerprint(conn.info.password), used_at))
                served += 1
            await asyncio.sleep(0.005)

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(6))), timeout=120)

    stats = pool.get_stats()
    assert len(endpoint.issued) >= 5 and served > 100
    # Tokens are cached: at most one request to the endpoint per new connection (in fact fewer:
    # connections opened while a token is fresh share it).
    assert endpoint.requests < stats["connections_num"]
    # Connections are recycled before their token expires: none was used with an expired one.
    for token, used_at in uses:
        assert used_at < endpoint.issued[token]
    # No token reached the logs, whatever the level.
    assert caplog.records and endpoint.tokens
    assert not [token for token in endpoint.tokens if token in caplog.text]


async def test_the_pool_uses_tls_verify_full(entra_settings: Settings, endpoint: IdentityEndpoint) -> None:
    pool = await get_pool("query", entra_settings)
    async with pool.connection() as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.info.host == "localhost"
        assert await (await conn.execute("SHOW default_transaction_read_only")).fetchone() == ("on",)


async def health(app_env: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = await health_get(func.HttpRequest("GET", "http://localhost/api/health", body=b""))
    return response.status_code, json.loads(response.get_body()), dict(response.headers)


async def test_health_is_ok_in_entra_mode(entra_settings: Settings, entra_env: dict[str, str]) -> None:
    status, body, _ = await health(entra_env)
    assert status == 200 and body["database"] == "ok"


@pytest.mark.parametrize("mode", ["invalid", "expired", "error", "hang"])
async def test_a_bad_token_answers_503(
    mode: str,
    entra_settings: Settings,
    entra_env: dict[str, str],
    endpoint: IdentityEndpoint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint.mode = mode
    caplog.set_level(logging.WARNING)
    try:
        status, body, headers = await health(entra_env)
    finally:
        endpoint.release.set()  # a hanging endpoint answers now, freeing the token thread
    assert status == 503
    assert body["code"] == "busy" and body["database"] == "unreachable"
    assert "Retry-After" in headers
    assert endpoint.requests >= 1
    reasons = {
        "invalid": "authentication failed",
        "expired": "expired",
        "error": "identity not found for client id",
        "hang": "did not finish within",
    }
    assert reasons[mode] in caplog.text


async def test_a_query_waits_no_longer_than_the_pool_timeout(
    entra_settings: Settings, endpoint: IdentityEndpoint
) -> None:
    endpoint.mode = "hang"
    pool = await get_pool("query", entra_settings)
    try:
        with pytest.raises(PoolTimeout):
            async with pool.connection():
                pass
    finally:
        endpoint.release.set()
