"""Microsoft Entra ID tokens as PostgreSQL passwords (``RECSYS_DB_AUTH=entra``).

Azure Database for PostgreSQL accepts an Entra access token for the scope
``https://ossrdbms-aad.database.windows.net/.default`` as the password of the role mapped to
the token's principal. The token is checked once, when a connection authenticates; an
established connection stays valid after the token expires. So the pool asks for a password
only when it opens a connection, and this module answers from a cache that it refreshes
ahead of expiry: one token serves every connection opened during most of its lifetime.

In Azure Functions the managed identity endpoint is announced by ``IDENTITY_ENDPOINT`` and
``IDENTITY_HEADER``; ``ManagedIdentityCredential`` talks to it (with a client id for a
user-assigned identity). Elsewhere (a developer's machine) ``DefaultAzureCredential`` finds
the Azure CLI / VS Code / environment login.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from azure.core.credentials import TokenCredential

from recsys.config import Settings

__all__ = [
    "ENTRA_SCOPE",
    "EntraPasswordProvider",
    "TokenUnavailable",
    "build_credential",
    "entra_password_provider",
]

log = logging.getLogger("recsys")

ENTRA_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"

#: Refresh a token this long before it expires (at most half its lifetime). Entra tokens
#: live an hour or more; five minutes leaves room for a slow or failing token endpoint.
REFRESH_MARGIN = 300.0
#: A connection is recycled this long before its token expires (at most a quarter of the
#: token's lifetime), so no pooled connection outlives the credential it was opened with.
RECYCLE_MARGIN = 60.0
#: Token fingerprints remembered for :meth:`EntraPasswordProvider.deadline_for`.
_REMEMBERED = 8


class TokenUnavailable(psycopg.OperationalError):
    """No Entra token could be obtained; the database cannot be reached right now (503)."""


def build_credential(
    client_id: str | None, *, timeout: float, env: Mapping[str, str] | None = None
) -> TokenCredential:
    """The azure-identity credential for this environment.

    ``ManagedIdentityCredential`` when the managed identity endpoint is present (App Service,
    Azure Functions), else ``DefaultAzureCredential``. Each HTTP call to the token endpoint
    is bounded by ``timeout`` and retried once: the pool's own reconnection attempts are the
    retries that matter, and a thread stuck on an endpoint that does not answer is freed soon.
    """
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    env = os.environ if env is None else env
    transport: dict[str, Any] = {"connection_timeout": timeout, "read_timeout": timeout, "retry_total": 1}
    if env.get("IDENTITY_ENDPOINT"):
        return ManagedIdentityCredential(client_id=client_id, **transport)
    return DefaultAzureCredential(managed_identity_client_id=client_id, **transport)


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EntraPasswordProvider:
    """A thread-safe, caching source of Entra tokens to use as passwords.

    Calling it returns a token valid for a while yet: the cached one, or a new one once the
    cached one is within its refresh margin. Concurrent callers wait (at most ``wait`` seconds)
    for a single refresh.
    Raises :class:`TokenUnavailable` (logged with its reason) when no valid token can be had.
    """

    def __init__(
        self,
        credential: TokenCredential,
        *,
        scope: str = ENTRA_SCOPE,
        wait: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credential = credential
        self._scope = scope
        self._wait = wait
        self._clock = clock
        self._lock = threading.Lock()  # guards the cached state
        self._refreshing = threading.Lock()  # held by the one caller asking for a new token
        self._token: str | None = None
        self._expires_on = 0.0
        self._refresh_at = 0.0
        # Fingerprint -> recycle deadline of recently issued tokens; never the tokens themselves.
        self._deadlines: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return f"EntraPasswordProvider(scope={self._scope!r}, cached={self._token is not None})"

    def __call__(self) -> str:
        with self._lock:
            token, now = self._token, self._clock()
            if token is not None and now < self._refresh_at:
                return token
            still_valid = token is not None and now < self._expires_on
        # One caller refreshes; while it does, the others keep using a token that is still valid,
        # or wait for it a bounded time (so a hanging endpoint never piles up waiting threads).
        if still_valid:
            if not self._refreshing.acquire(blocking=False):
                assert token is not None
                return token
        elif not self._refreshing.acquire(timeout=self._wait):
            log.warning("entra token request already in progress for %g s; not waiting longer", self._wait)
            raise TokenUnavailable("an entra token request is already in progress")
        try:
            with self._lock:
                if self._token is not None and self._clock() < self._refresh_at:
                    return self._token
            return self._refresh()
        finally:
            self._refreshing.release()

    def _refresh(self) -> str:
        try:
            access = self._credential.get_token(self._scope)
        except Exception as exc:
            with self._lock:
                if self._token is not None and self._clock() < self._expires_on:
                    log.warning("entra token refresh failed, the current token serves until it expires: %s: %s",
                                type(exc).__name__, exc)
                    return self._token
            log.warning("entra token request failed: %s: %s", type(exc).__name__, exc)
            raise TokenUnavailable(f"no entra token: {type(exc).__name__}") from exc
        now = self._clock()
        expires_on = float(access.expires_on)
        if expires_on <= now:
            log.warning("entra token request returned a token that expired %.0f s ago", now - expires_on)
            raise TokenUnavailable("the entra token endpoint returned an expired token")
        lifetime = expires_on - now
        with self._lock:
            self._token = access.token
            self._expires_on = expires_on
            self._refresh_at = expires_on - min(REFRESH_MARGIN, lifetime / 2)
            self._deadlines[_fingerprint(access.token)] = expires_on - min(RECYCLE_MARGIN, lifetime / 4)
            while len(self._deadlines) > _REMEMBERED:
                self._deadlines.popitem(last=False)
        log.info("entra token obtained, valid for %.0f s", lifetime)
        return access.token

    def deadline_for(self, token: str | None) -> float | None:
        """Epoch time by which a connection opened with ``token`` should be recycled."""
        if token is None:
            return None
        with self._lock:
            return self._deadlines.get(_fingerprint(token))


def entra_password_provider(settings: Settings, *, purpose: str = "query") -> EntraPasswordProvider:
    """The password source of the pool for ``purpose`` in Entra mode.

    Each path authenticates as its own principal: ``RECSYS_ENTRA_CLIENT_ID`` for queries,
    ``RECSYS_LOADER_ENTRA_CLIENT_ID`` for the loader (Azure maps one Entra principal to one
    PostgreSQL role, named in the path's database URL).
    """
    credential = build_credential(settings.entra_client_id_for(purpose), timeout=settings.connect_timeout)
    return EntraPasswordProvider(credential, wait=settings.connect_timeout)
