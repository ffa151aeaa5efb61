"""Azure Storage clients for a :class:`~recsys.config.StorageAccount`: by key or by identity.

With a connection string the SDK signs requests with the account key (or talks to Azurite's
development account). Identity-based, every request carries an Entra token of the app's
managed identity for ``https://storage.azure.com``, as the Functions host's own queue trigger
does with the same settings; no key is ever configured.

The async SDK clients want an async credential, whose HTTP session belongs to one event loop.
The clients here are made and closed per call (see ``recsys.ingest.storage``), so the token
source is instead one synchronous azure-identity credential per identity for the whole
process (it caches its tokens until shortly before they expire), asked from a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import TYPE_CHECKING, Any

from recsys.config import StorageAccount

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken, TokenCredential
    from azure.storage.blob.aio import BlobServiceClient
    from azure.storage.queue.aio import QueueClient

__all__ = ["blob_service", "queue_client", "storage_credential"]

#: Seconds for one HTTP exchange with the token endpoint.
TOKEN_TIMEOUT = 10.0


class ThreadedCredential:
    """An async token credential over a synchronous one (``AsyncTokenCredential`` protocol)."""

    def __init__(self, credential: TokenCredential) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return await asyncio.to_thread(self._credential.get_token, *scopes, **kwargs)

    async def close(self) -> None:
        """Nothing to close: the synchronous credential is shared by the process."""

    async def __aenter__(self) -> ThreadedCredential:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


@functools.cache
def _sync_credential(kind: str | None, client_id: str | None, identity_endpoint: str | None) -> TokenCredential:
    from azure.identity import ManagedIdentityCredential

    from recsys.db.credentials import build_credential

    transport: dict[str, Any] = {"connection_timeout": TOKEN_TIMEOUT, "read_timeout": TOKEN_TIMEOUT}
    if kind == "managedidentity":
        return ManagedIdentityCredential(client_id=client_id, **transport)
    # No explicit credential: the managed identity where the platform announces one, else the
    # developer's sign-in (DefaultAzureCredential), as the Functions host and Core Tools do.
    return build_credential(client_id, timeout=TOKEN_TIMEOUT)


def storage_credential(account: StorageAccount) -> ThreadedCredential:
    """The process-wide token source of an identity-based ``account``."""
    endpoint = os.environ.get("IDENTITY_ENDPOINT")
    return ThreadedCredential(_sync_credential(account.credential, account.client_id, endpoint))


def queue_client(account: StorageAccount, queue_name: str) -> QueueClient:
    """An async client of ``queue_name`` (the caller closes it, e.g. ``async with``)."""
    from azure.storage.queue.aio import QueueClient

    if account.connection_string is not None:
        return QueueClient.from_connection_string(account.connection_string, queue_name)
    assert account.queue_service_uri is not None
    return QueueClient(account.queue_service_uri, queue_name, credential=storage_credential(account))


def blob_service(account: StorageAccount) -> BlobServiceClient:
    """An async client of the account's Blob service (the caller closes it)."""
    from azure.storage.blob.aio import BlobServiceClient

    if account.connection_string is not None:
        return BlobServiceClient.from_connection_string(account.connection_string)
    assert account.blob_service_uri is not None
    return BlobServiceClient(account.blob_service_uri, credential=storage_credential(account))
