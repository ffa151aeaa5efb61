"""Storage without keys: the producer, the loader and the local host's queue trigger by identity.

Azurite runs with ``--oauth basic`` over HTTPS (a certificate of the stack's CA): it accepts an
Entra bearer token whose issuer is an Entra token service, whose audience is Storage
(``https://storage.azure.com``) and which is within its lifetime. The app is given only
``AzureWebJobsStorage__queueServiceUri`` / ``__blobServiceUri``, ``__credential=managedidentity``
and ``__clientId``; the real azure-identity ``ManagedIdentityCredential`` fetches its tokens from
a local stand-in for the Functions managed identity endpoint. The test inspects the result with
the account key, as an operator would.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import jwt
import psycopg
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient
from identity_endpoint import ManagedIdentityEndpoint

from recsys.config import Settings, forget_settings, load_settings
from recsys.ingest import storage
from recsys.ingest.loader import process_message
from recsys.ingest.messages import BlobRef
from recsys.ingest.producer import enqueue_document
from recsys.local.host import FunctionHost, HostConfig, QueueOptions, serve_in_thread
from recsys.local.stack import Stack, StackConfig, free_port

pytestmark = pytest.mark.integration

STORAGE_RESOURCE = "https://storage.azure.com"
CLIENT_ID = "0c1f7e9a-5b2d-4c8e-9f3a-7d6e5c4b3a21"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


class Tokens:
    """Issues Entra-shaped JWTs; ``mode`` makes them wrong to see Azurite refuse them."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | wrong-audience | expired
        self.issued: list[str] = []
        self._key = uuid.uuid4().hex

    def issue(self) -> tuple[int, dict[str, Any]]:
        now = int(time.time())
        claims = {
            "aud": "https://ossrdbms-aad.database.windows.net" if self.mode == "wrong-audience" else STORAGE_RESOURCE,
            "iss": f"https://sts.windows.net/{TENANT}/",
            "iat": now - 5, "nbf": now - 5, "exp": now - 60 if self.mode == "expired" else now + 3600,
            "appid": CLIENT_ID, "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, CLIENT_ID)), "tid": TENANT,
        }
        token = jwt.encode(claims, self._key, algorithm="HS256")
        self.issued.append(token)
        expires_on = claims["exp"] if self.mode != "expired" else now + 3600  # what the endpoint claims
        return 200, {"access_token": token, "expires_on": str(expires_on), "resource": STORAGE_RESOURCE,
                     "token_type": "Bearer", "client_id": CLIENT_ID}


@pytest.fixture(scope="module")
def oauth_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An Azurite of its own with OAuth on (HTTPS); the session stack keeps the database."""
    stack = Stack(StackConfig.ephemeral(Path(tmp_path_factory.mktemp("oauth-azurite")), storage_oauth=True))
    # The SDK's HTTP client verifies Azurite's certificate against the process's default trust
    # store; trust the stack's CA there, as a developer installs a local CA.
    import aiohttp.connector

    aiohttp.connector._SSL_CONTEXT_VERIFIED.load_verify_locations(cafile=str(stack.tls_files.ca_cert))
    try:
        stack.start_azurite()
        yield stack
    finally:
        stack.stop_azurite()


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def identity(tokens: Tokens, monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedIdentityEndpoint]:
    endpoint = ManagedIdentityEndpoint(STORAGE_RESOURCE, CLIENT_ID, tokens.issue)
    with endpoint.serving() as url:
        monkeypatch.setenv("IDENTITY_ENDPOINT", url)
        monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
        yield endpoint


@pytest.fixture
def keyless_env(
    stack_env: dict[str, str], oauth_azurite: Stack, identity: ManagedIdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The app settings: no connection string anywhere, only where the account is and who we are."""
    env = {**oauth_azurite.storage_identity_environment(), "AzureWebJobsStorage__clientId": CLIENT_ID}
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    forget_settings()
    yield env
    forget_settings()


@pytest.fixture
def keyless(keyless_env: dict[str, str]) -> Settings:
    import os

    settings = load_settings(os.environ)
    assert settings.storage.keyless and settings.storage_connection == ""
    assert "AccountKey" not in repr(settings) and "Eby8" not in repr(settings)
    return settings


def keyed_queue(stack: Stack, name: str) -> QueueClient:
    """The operator's view, with the account key."""
    return QueueClient.from_connection_string(
        stack.storage_connection_string(), name, connection_verify=str(stack.tls_files.ca_cert)
    )


def keyed_blobs(stack: Stack) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(
        stack.storage_connection_string(), connection_verify=str(stack.tls_files.ca_cert)
    )


def assert_storage_tokens(tokens: Tokens) -> None:
    assert tokens.issued
    for token in tokens.issued:
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["aud"] == STORAGE_RESOURCE and claims["appid"] == CLIENT_ID


def ledger(stack: Stack, batch_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.admin_conninfo()) as conn:
        return conn.execute(
            "SELECT part, status, rows FROM ingest_batches WHERE batch_id = %s ORDER BY part", [batch_id]
        ).fetchall()


async def test_producer_loader_blobs_and_poison_work_with_the_managed_identity_alone(
    keyless: Settings, oauth_azurite: Stack, stack: Stack, tokens: Tokens, identity: ManagedIdentityEndpoint,
    app_pools: None,
) -> None:
    prefix = f"keyless-{uuid.uuid4().hex[:8]}-"
    rng_items = [
        {"id": f"{prefix}{i}", "embedding": [((i * 7 + j) % 13) / 13 + 0.01 for j in range(keyless.embedding_dim)]}
        for i in range(40)
    ]  # about 300 KB of JSON: a claim-check blob and one message
    enqueued = await enqueue_document({"batch_id": f"{prefix}b", "items": rng_items}, settings=keyless)
    assert (enqueued.messages, enqueued.blobs) == (1, 1)

    with keyed_queue(oauth_azurite, keyless.queue_name) as queue:
        (message,) = list(queue.receive_messages(max_messages=32, visibility_timeout=60))
        body = base64.b64decode(message.content)
        container, name = json.loads(body)["blob"].split("/", 1)
        with keyed_blobs(oauth_azurite) as blobs:
            assert blobs.get_blob_client(container, name).exists()

        # The loader downloads the blob, loads it and deletes the blob, keyless.
        outcome = await process_message(body, settings=keyless)
        queue.delete_message(message)
    assert outcome.status == "loaded"
    assert ledger(stack, f"{prefix}b") == [(0, "loaded", 40)]
    with keyed_blobs(oauth_azurite) as blobs:
        assert not blobs.get_blob_client(container, name).exists()

    # A message that can never load goes to the poison queue, sent with a token too.
    bad = b"not {json" + prefix.encode()
    poisoned = await process_message(bad, settings=keyless)
    assert poisoned.status == "failed"
    with keyed_queue(oauth_azurite, keyless.poison_queue_name) as poison:
        assert bad in [base64.b64decode(m.content) for m in poison.peek_messages(max_messages=32)]

    # Blob helpers by identity: upload, download, delete.
    ref = BlobRef(keyless.blob_container, f"{prefix}direct.json")
    await storage.upload_blob(keyless, ref, b'{"x": 1}')
    assert await storage.download_blob(keyless, ref) == b'{"x": 1}'
    await storage.delete_blob(keyless, ref)
    assert await storage.download_blob(keyless, ref) is None

    assert_storage_tokens(tokens)
    # A dozen storage calls above; the credential caches its token instead of asking for each.
    assert 1 <= identity.requests <= 2


@pytest.mark.parametrize("mode", ["wrong-audience", "expired"])
async def test_storage_refuses_a_token_it_must_not_accept(keyless: Settings, tokens: Tokens, mode: str) -> None:
    tokens.mode = mode
    from recsys.ingest import clients

    clients._sync_credential.cache_clear()  # a fresh credential: nothing cached from other tests
    with pytest.raises(HttpResponseError) as failure:
        await storage.send_messages(keyless, f"refused-{mode}", [b"{}"])
    assert failure.value.status_code in (401, 403)
    assert tokens.issued  # a token was fetched and sent, and Azurite refused it


def test_the_local_host_queue_trigger_reads_with_the_managed_identity(
    keyless_env: dict[str, str], oauth_azurite: Stack, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYLESS_QUEUE", "keyless-host")
    for key, value in keyless_env.items():  # a connection of its own name, as bindings allow
        monkeypatch.setenv(key.replace("AzureWebJobsStorage", "KeylessStorage"), value)
    seen: list[bytes] = []
    app = func.FunctionApp()

    @app.queue_trigger(arg_name="msg", queue_name="%KEYLESS_QUEUE%", connection="KeylessStorage")
    def keyless_seen(msg: func.QueueMessage) -> None:
        seen.append(msg.get_body())

    config = HostConfig(queues=QueueOptions(batch_size=4, max_polling_interval=0.5, max_dequeue_count=3))
    with serve_in_thread(FunctionHost(app, config), free_port()), keyed_queue(oauth_azurite, "keyless-host") as queue:
        deadline = time.monotonic() + 30
        while True:  # the host creates its queue (by identity) when it starts listening
            try:
                queue.send_message(base64.b64encode(b"by identity").decode())
                break
            except HttpResponseError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        while not seen:
            assert time.monotonic() < deadline, "the queue trigger did not run"
            time.sleep(0.05)
    assert seen == [b"by identity"]
    assert_storage_tokens(tokens)

