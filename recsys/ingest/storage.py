"""Azure Storage for the ingest path: the batch queue, its poison queue, and claim-check blobs.

Clients are created per call from ``AzureWebJobsStorage``, by connection string or keyless with
the app's managed identity (``recsys.ingest.clients``; the async SDK clients own an HTTP
session each; a call here sends a handful of requests, so the set-up cost is negligible) and
closed at once, so nothing is bound to an event loop between calls.

Queue messages are sent base64-encoded: the Functions host decodes them with the default
``messageEncoding`` (``base64``) of host.json before the queue trigger sees them.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Sequence

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from recsys.config import Settings
from recsys.errors import InvalidArgument
from recsys.ingest.clients import blob_service, queue_client
from recsys.ingest.messages import BlobRef

__all__ = ["delete_blob", "download_blob", "send_messages", "upload_blob"]


def _wire(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


async def send_messages(
    settings: Settings,
    queue_name: str,
    payloads: Sequence[bytes],
    *,
    visibility_timeout: int | None = None,
    time_to_live: int | None = None,
) -> None:
    """Send each payload (UTF-8 JSON) as one base64 message; creates the queue when missing.

    ``visibility_timeout`` delays the message (seconds; a retry's backoff), ``time_to_live``
    overrides the queue's default lifetime of 7 days (seconds).
    """
    options = {"visibility_timeout": visibility_timeout, "time_to_live": time_to_live}
    async with queue_client(settings.storage, queue_name) as queue:
        for payload in payloads:
            try:
                await queue.send_message(_wire(payload), **options)
            except ResourceNotFoundError:
                # A fresh storage account: the Functions host creates the queue only when it
                # starts listening, which may be after the first producer sends.
                with contextlib.suppress(ResourceExistsError):
                    await queue.create_queue()
                await queue.send_message(_wire(payload), **options)


async def upload_blob(settings: Settings, ref: BlobRef, data: bytes) -> None:
    """Store ``data`` at ``ref`` (overwriting); creates the container when missing."""
    async with blob_service(settings.storage) as service:
        blob = service.get_blob_client(ref.container, ref.name)
        try:
            await blob.upload_blob(data, overwrite=True, content_type="application/json")
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                await service.create_container(ref.container)
            await blob.upload_blob(data, overwrite=True, content_type="application/json")


async def download_blob(settings: Settings, ref: BlobRef, *, max_bytes: int | None = None) -> bytes | None:
    """The content of ``ref``, or ``None`` when the blob (or its container) does not exist.

    With ``max_bytes``, a larger blob raises :class:`InvalidArgument` (field ``blob``) before
    its content is read, and the read stops there should the blob grow meanwhile: a producer's
    blob can never make the loader hold more than that in memory.
    """
    async with blob_service(settings.storage) as service:
        blob = service.get_blob_client(ref.container, ref.name)
        try:
            stream = await blob.download_blob()
            if max_bytes is None:
                return await stream.readall()
            if stream.size > max_bytes:
                raise _too_large(ref, stream.size, max_bytes)
            chunks: list[bytes] = []
            received = 0
            async for chunk in stream.chunks():
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(ref, received, max_bytes)
                chunks.append(chunk)
            return b"".join(chunks)
        except ResourceNotFoundError:
            return None


def _too_large(ref: BlobRef, size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {ref} is {size} bytes, more than the limit of {limit} bytes for one part; "
        "split the batch into smaller parts",
        field="blob",
    )


async def delete_blob(settings: Settings, ref: BlobRef) -> None:
    """Delete ``ref``; a blob already gone is not an error."""
    async with blob_service(settings.storage) as service:
        with contextlib.suppress(ResourceNotFoundError):
            await service.get_blob_client(ref.container, ref.name).delete_blob()
