"""Settings of the service, read once from a mapping (the process environment by default).

Every value is validated when the settings are loaded; a bad value raises
:class:`SettingsError` naming the variable, so a misconfigured app stops at start
instead of failing on its first request.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar

__all__ = [
    "LOCAL_DATABASE_URL",
    "LOCAL_LOADER_DATABASE_URL",
    "LOCAL_MAINTENANCE_DATABASE_URL",
    "Settings",
    "SettingsError",
    "StorageAccount",
    "default_vector_type",
    "forget_settings",
    "get_settings",
    "load_settings",
    "pin_settings",
    "redact",
    "settings_environment",
    "storage_account",
]

#: The local stack's PgBouncer as the query role (see ``recsys.local.stack``, ``sql/030_roles.sql``);
#: a development-only password.
LOCAL_DATABASE_URL = "postgresql://recsys_query:recsys-local@127.0.0.1:6432/recsys"
#: The same PgBouncer as the loader role.
LOCAL_LOADER_DATABASE_URL = "postgresql://recsys_loader:recsys-local@127.0.0.1:6432/recsys"
#: The same PgBouncer as the housekeeping role (``sql/058_maintenance.sql``).
LOCAL_MAINTENANCE_DATABASE_URL = "postgresql://recsys_maintainer:recsys-local@127.0.0.1:6432/recsys"
#: Daily at 03:30 UTC (NCRONTAB: second minute hour day month day-of-week).
DEFAULT_MAINTENANCE_SCHEDULE = "0 30 3 * * *"

DB_AUTH_MODES = ("password", "entra")
#: Pools that connect as the loader role: the loader's own, and the producers' ``ingest`` pool.
WRITE_PURPOSES = ("loader", "ingest")
#: libpq's ``target_session_attrs`` and ``load_balance_hosts`` values (libpq 16 and later).
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random")
#: ``target_session_attrs`` that may choose a standby: never for the loader, which writes.
STANDBY_ATTRS = ("read-only", "standby", "prefer-standby")
VECTOR_TYPES = ("vector", "halfvec")
#: The most dimensions pgvector's HNSW index takes per column type.
INDEX_MAX_DIM = {"vector": 2000, "halfvec": 4000}
#: HNSW links per node and build-time candidate list of new indexes. pgvector's own default
#: ef_construction, 64, loses about 2 % of searches on a clustered catalogue of 200,000 items
#: (their search ends in another cluster); 128 loses about 0.25 %, for builds 1.3-1.5x as long
#: (``python -m recsys bench graph``).
DEFAULT_HNSW_M = 16
DEFAULT_HNSW_EF_CONSTRUCTION = 128
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

T = TypeVar("T")

# Secrets inside connection strings: the password of a URL's user info, ``password=`` in a
# libpq key=value string or a URL query, and Azure Storage account keys and SAS tokens.
_URL_PASSWORD = re.compile(r"(?P<keep>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]*(?=@)", re.IGNORECASE)
_KEY_VALUE_SECRET = re.compile(
    r"(?P<keep>\b(?:password|accountkey|sharedaccesssignature|sig)\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s;&]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every password, account key and SAS signature replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<keep>***", text)
    return _KEY_VALUE_SECRET.sub(r"\g<keep>***", text)


class SettingsError(ValueError):
    """A setting is missing or malformed; ``name`` is the variable at fault."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"setting {name}: {message}")
        self.name = name


#: The only value of ``<connection>__credential`` (as the Functions host reads it).
STORAGE_CREDENTIALS = ("managedidentity",)
_STORAGE_ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")


@dataclass(frozen=True)
class StorageAccount:
    """How to reach a storage account: a connection string, or service URIs and an identity.

    Identity-based (``connection_string`` is ``None``): requests carry Entra tokens of the
    managed identity (``client_id`` for a user-assigned one), never an account key.
    """

    connection_string: str | None = field(default="UseDevelopmentStorage=true", repr=False)
    queue_service_uri: str | None = None
    blob_service_uri: str | None = None
    #: ``managedidentity``, or ``None``: the environment's identity (managed identity in Azure,
    #: the developer's Azure CLI or IDE sign-in elsewhere), as the Functions host does.
    credential: str | None = None
    client_id: str | None = None

    @property
    def keyless(self) -> bool:
        return self.connection_string is None


def storage_account(
    env: Mapping[str, str], name: str = "AzureWebJobsStorage", *, default: str | None = "UseDevelopmentStorage=true"
) -> StorageAccount:
    """The storage connection ``name`` as the Functions host reads it from app settings.

    ``name`` holds a connection string; or ``name__accountName`` (or ``name__queueServiceUri`` and
    ``name__blobServiceUri``) with optional ``name__credential=managedidentity`` and
    ``name__clientId`` describe an identity-based connection. A connection string wins over the
    identity settings. With neither, ``default`` (a connection string) or :class:`SettingsError`.
    """
    prefix = f"{name}__"
    connection_string = _text(env, name, None)
    account = _text(env, f"{prefix}accountName", None)
    queue_uri = _text(env, f"{prefix}queueServiceUri", None)
    blob_uri = _text(env, f"{prefix}blobServiceUri", None)
    credential = _choice(env, f"{prefix}credential", None, STORAGE_CREDENTIALS)
    client_id = _text(env, f"{prefix}clientId", None)
    if connection_string is not None:
        return StorageAccount(connection_string=connection_string)
    if account is None and queue_uri is None and blob_uri is None:
        if default is None:
            raise SettingsError(name, f"is not set (nor {prefix}accountName / {prefix}queueServiceUri)")
        return StorageAccount(connection_string=default)
    if account is not None:
        if not _STORAGE_ACCOUNT_NAME.match(account):
            raise SettingsError(f"{prefix}accountName", "must be 3-24 lowercase letters or digits")
        queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
        blob_uri = blob_uri or f"https://{account}.blob.core.windows.net"
    for key, uri in (("queueServiceUri", queue_uri), ("blobServiceUri", blob_uri)):
        if uri is None:
            raise SettingsError(f"{prefix}{key}", f"must be set with the other service URI, or use {prefix}accountName")
        if not uri.startswith("https://"):
            # Storage accepts bearer tokens over HTTPS only (so do the SDK and Azurite).
            raise SettingsError(f"{prefix}{key}", f"must be an https:// URL, got {uri!r}")
    return StorageAccount(
        connection_string=None, queue_service_uri=queue_uri, blob_service_uri=blob_uri,
        credential=credential, client_id=client_id,
    )


@dataclass(frozen=True)
class Settings:
    """The validated settings. Its ``repr`` never shows a password, key or token."""

    database_url: str = LOCAL_DATABASE_URL
    #: The ingest path's URL (the loader role); the query path uses ``database_url``.
    loader_database_url: str = LOCAL_LOADER_DATABASE_URL
    db_auth: str = "password"
    entra_client_id: str | None = None
    #: Client id of the loader's user-assigned managed identity (Entra mode).
    loader_entra_client_id: str | None = None
    embedding_dim: int = 384
    #: Column type of the embeddings: ``vector`` (float32) or ``halfvec`` (float16, half the size).
    vector_type: str = "vector"
    #: HNSW graph links per node and build-time candidate list (migrations, bulk index builds).
    hnsw_m: int = DEFAULT_HNSW_M
    hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION
    pool_min_size: int = 1
    pool_max_size: int = 4
    pool_timeout: float = 5.0
    pool_max_lifetime: float = 1800.0
    statement_timeout_ms: int = 5000
    loader_statement_timeout_ms: int = 120_000
    connect_timeout: int = 5
    sslmode: str | None = None
    sslrootcert: str | None = None
    queue_name: str = "embedding-batches"
    #: The connection string of ``AzureWebJobsStorage``; empty when the account is reached keyless.
    storage_connection: str = "UseDevelopmentStorage=true"
    #: ``AzureWebJobsStorage``: the queue and blobs of the ingest path, by key or by identity.
    storage: StorageAccount = field(default_factory=StorageAccount)
    blob_container: str = "embedding-batches"
    function_key: str | None = field(default=None, repr=False)
    #: Days a deletion's version is remembered at least (longer than a queue message lives: 7 days).
    tombstone_retention_days: int = 8
    #: The housekeeping path's URL (the maintainer role) and managed identity (Entra mode).
    maintenance_database_url: str = LOCAL_MAINTENANCE_DATABASE_URL
    maintenance_entra_client_id: str | None = None
    maintenance_schedule: str = DEFAULT_MAINTENANCE_SCHEDULE
    #: Ledger rows (and claim-check blobs, calibration runs) older than this are pruned.
    ledger_retention_days: int = 30
    #: The loader's own retries of a transiently failing message: the longest delay between two
    #: attempts, and how long after the first failure it keeps trying before giving up.
    loader_retry_max_delay: float = 300.0
    loader_retry_window_hours: float = 24.0

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    def url_for(self, purpose: str) -> str:
        """The libpq URL of the pool for ``purpose``: ``query``, ``loader`` / ``ingest`` (the loader
        role) or ``maintenance`` (the housekeeping role)."""
        if purpose == "maintenance":
            return self.maintenance_database_url
        return self.loader_database_url if purpose in WRITE_PURPOSES else self.database_url

    def entra_client_id_for(self, purpose: str) -> str | None:
        """The managed identity whose tokens authenticate the pool for ``purpose``."""
        if purpose == "maintenance":
            return self.maintenance_entra_client_id
        return self.loader_entra_client_id if purpose in WRITE_PURPOSES else self.entra_client_id

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            if not item.repr:
                continue
            value = getattr(self, item.name)
            shown.append(f"{item.name}={redact(value)!r}" if isinstance(value, str) else f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _number(
    env: Mapping[str, str],
    name: str,
    default: T,
    kind: Callable[[str], T],
    low: float,
    high: float,
) -> T:
    raw = _text(env, name, None)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(name, f"{raw!r} is not a valid {kind.__name__}") from None
    if not low <= value <= high:  # type: ignore[operator]
        raise SettingsError(name, f"must be between {low:g} and {high:g}, got {raw}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str | None, choices: tuple[str, ...]) -> str | None:
    value = _text(env, name, default)
    if value is not None and value not in choices:
        raise SettingsError(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def default_vector_type(dim: int) -> str:
    """``vector`` wherever its HNSW index reaches (2000 dimensions), ``halfvec`` above."""
    return "vector" if dim <= INDEX_MAX_DIM["vector"] else "halfvec"


def _vector_settings(env: Mapping[str, str]) -> tuple[int, str, int, int]:
    dim = _number(env, "RECSYS_EMBEDDING_DIM", 384, int, 1, INDEX_MAX_DIM["halfvec"])
    vector_type = _choice(env, "RECSYS_VECTOR_TYPE", default_vector_type(dim), VECTOR_TYPES) or "vector"
    if dim > INDEX_MAX_DIM[vector_type]:
        raise SettingsError(
            "RECSYS_VECTOR_TYPE",
            f"the HNSW index takes {vector_type} up to {INDEX_MAX_DIM[vector_type]} dimensions, "
            f"RECSYS_EMBEDDING_DIM is {dim}: use halfvec",
        )
    # pgvector's bounds: m 2-100, ef_construction 4-1000 and at least 2 * m.
    m = _number(env, "RECSYS_HNSW_M", DEFAULT_HNSW_M, int, 2, 100)
    ef_construction = _number(env, "RECSYS_HNSW_EF_CONSTRUCTION", DEFAULT_HNSW_EF_CONSTRUCTION, int, 4, 1000)
    if ef_construction < 2 * m:
        raise SettingsError("RECSYS_HNSW_EF_CONSTRUCTION", f"must be at least 2 * RECSYS_HNSW_M ({2 * m})")
    return dim, vector_type, m, ef_construction


def _database_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default) or default
    if not value.startswith(("postgresql://", "postgres://")) and "=" not in value:
        raise SettingsError(name, "must be a postgresql:// URL or a libpq key=value string")
    _servers(name, value)
    return value


def _servers(name: str, url: str) -> tuple[int, str]:
    """The number of hosts a libpq URL lists and its ``target_session_attrs``, checked.

    libpq's multi-host syntax (``host1:port1,host2:port2``) is how the query path reaches
    several servers (read replicas); a list libpq would refuse only at the first connection
    is refused here, naming the variable.
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except ProgrammingError:
        raise SettingsError(name, "is not a valid libpq connection string") from None
    hosts = str(params.get("host") or params.get("hostaddr") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise SettingsError(name, f"lists {len(hosts)} hosts but {len(ports)} ports")
    if any(port.strip() and not port.strip().isdigit() for port in ports):
        raise SettingsError(name, "has a port that is not a number")
    attrs = str(params.get("target_session_attrs") or "any")
    if attrs not in TARGET_SESSION_ATTRS:
        choices = ", ".join(TARGET_SESSION_ATTRS)
        raise SettingsError(name, f"target_session_attrs must be one of {choices}, got {attrs!r}")
    balance = str(params.get("load_balance_hosts") or "disable")
    if balance not in LOAD_BALANCE_HOSTS:
        choices = ", ".join(LOAD_BALANCE_HOSTS)
        raise SettingsError(name, f"load_balance_hosts must be one of {choices}, got {balance!r}")
    return len(hosts), attrs


def _loader_url(env: Mapping[str, str], query_url: str, explicit_query_url: str | None) -> str:
    """The loader's URL: it writes (items, the ledger, calibrations), so it must reach the primary.

    It defaults to the query path's URL, which is wrong once that URL lists read replicas:
    then ``RECSYS_LOADER_DATABASE_URL`` must name the primary itself.
    """
    name = "RECSYS_LOADER_DATABASE_URL"
    if _text(env, name, None) is None and explicit_query_url is not None:
        hosts, attrs = _servers("RECSYS_DATABASE_URL", query_url)
        if hosts > 1 or attrs in STANDBY_ATTRS:
            raise SettingsError(
                name, "must be set (to the primary) when RECSYS_DATABASE_URL lists several hosts or standbys"
            )
    url = _database_url(env, name, explicit_query_url or LOCAL_LOADER_DATABASE_URL)
    _check_reaches_primary(name, url)
    return url


def _check_reaches_primary(name: str, url: str) -> None:
    """Refuse a URL of a writing path that could land on a standby."""
    hosts, attrs = _servers(name, url)
    if attrs in STANDBY_ATTRS:
        raise SettingsError(name, f"must reach the primary, not target_session_attrs={attrs}")
    if hosts > 1 and attrs not in ("primary", "read-write"):
        raise SettingsError(
            name, "lists several hosts: add target_session_attrs=primary so that writes reach the primary"
        )


def _schedule(env: Mapping[str, str], name: str, default: str) -> str:
    from recsys.ncrontab import ScheduleError, parse_schedule

    value = _text(env, name, default) or default
    try:
        parse_schedule(value)
    except ScheduleError as exc:
        raise SettingsError(name, f"{value!r} is not an NCRONTAB schedule: {exc}") from None
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``).

    Raises :class:`SettingsError` naming the first invalid variable.
    """
    if env is None:
        env = os.environ
    database_url = _database_url(env, "RECSYS_DATABASE_URL", LOCAL_DATABASE_URL)
    # One URL for both paths unless the loader has its own (its own role, or in Entra mode its
    # own managed identity); with neither set, the local stack's loader role.
    explicit_query_url = _text(env, "RECSYS_DATABASE_URL", None)
    loader_database_url = _loader_url(env, database_url, explicit_query_url)
    # Housekeeping connects as its own role (it may delete bookkeeping rows, which the loader
    # may not); with only a loader URL given, that one (grant it recsys_maintainer, README).
    maintenance_database_url = _database_url(
        env, "RECSYS_MAINTENANCE_DATABASE_URL",
        loader_database_url
        if _text(env, "RECSYS_LOADER_DATABASE_URL", None) or explicit_query_url
        else LOCAL_MAINTENANCE_DATABASE_URL,
    )
    _check_reaches_primary("RECSYS_MAINTENANCE_DATABASE_URL", maintenance_database_url)
    entra_client_id = _text(env, "RECSYS_ENTRA_CLIENT_ID", None)
    loader_entra_client_id = _text(env, "RECSYS_LOADER_ENTRA_CLIENT_ID", entra_client_id)
    queue_name = _text(env, "RECSYS_QUEUE_NAME", "embedding-batches")
    assert queue_name is not None
    if not (3 <= len(queue_name) <= 57 and queue_name.replace("-", "").isalnum() and queue_name.islower()):
        raise SettingsError(
            "RECSYS_QUEUE_NAME",
            "must be 3-57 lowercase letters, digits or dashes (the poison queue adds '-poison')",
        )
    storage = storage_account(env, "AzureWebJobsStorage")
    embedding_dim, vector_type, hnsw_m, hnsw_ef_construction = _vector_settings(env)
    settings = Settings(
        database_url=database_url,
        loader_database_url=loader_database_url,
        db_auth=_choice(env, "RECSYS_DB_AUTH", "password", DB_AUTH_MODES) or "password",
        entra_client_id=entra_client_id,
        loader_entra_client_id=loader_entra_client_id,
        embedding_dim=embedding_dim,
        vector_type=vector_type,
        hnsw_m=hnsw_m,
        hnsw_ef_construction=hnsw_ef_construction,
        pool_min_size=_number(env, "RECSYS_POOL_MIN_SIZE", 1, int, 0, 1000),
        pool_max_size=_number(env, "RECSYS_POOL_MAX_SIZE", 4, int, 1, 1000),
        pool_timeout=_number(env, "RECSYS_POOL_TIMEOUT", 5.0, float, 0.1, 300),
        pool_max_lifetime=_number(env, "RECSYS_POOL_MAX_LIFETIME", 1800.0, float, 10, 86400),
        statement_timeout_ms=_number(env, "RECSYS_STATEMENT_TIMEOUT_MS", 5000, int, 1, 3_600_000),
        loader_statement_timeout_ms=_number(
            env, "RECSYS_LOADER_STATEMENT_TIMEOUT_MS", 120_000, int, 1000, 3_600_000
        ),
        connect_timeout=_number(env, "RECSYS_CONNECT_TIMEOUT", 5, int, 1, 300),
        sslmode=_choice(env, "RECSYS_SSLMODE", None, SSL_MODES),
        sslrootcert=_text(env, "RECSYS_SSLROOTCERT", None),
        queue_name=queue_name,
        storage_connection=storage.connection_string or "",
        storage=storage,
        blob_container=_text(env, "RECSYS_BLOB_CONTAINER", "embedding-batches") or "",
        function_key=_text(env, "RECSYS_FUNCTION_KEY", None),
        maintenance_database_url=maintenance_database_url,
        maintenance_entra_client_id=_text(env, "RECSYS_MAINTENANCE_ENTRA_CLIENT_ID", loader_entra_client_id),
        maintenance_schedule=_schedule(env, "RECSYS_MAINTENANCE_SCHEDULE", DEFAULT_MAINTENANCE_SCHEDULE),
        ledger_retention_days=_number(env, "RECSYS_LEDGER_RETENTION_DAYS", 30, int, 8, 3650),
        tombstone_retention_days=_number(env, "RECSYS_TOMBSTONE_RETENTION_DAYS", 8, int, 1, 3650),
        loader_retry_max_delay=_number(env, "RECSYS_LOADER_RETRY_MAX_DELAY", 300.0, float, 1, 3600),
        loader_retry_window_hours=_number(env, "RECSYS_LOADER_RETRY_WINDOW_HOURS", 24.0, float, 0, 144),
    )
    if settings.pool_min_size > settings.pool_max_size:
        raise SettingsError("RECSYS_POOL_MIN_SIZE", "must not exceed RECSYS_POOL_MAX_SIZE")
    return settings


#: Settings fixed for one context (a local host in a thread: see :func:`pin_settings`).
_pinned: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("recsys_settings", default=None)


def get_settings() -> Settings:
    """The settings the app runs with: those pinned for the current context, if any, else the
    process's, loaded from the environment on first use."""
    pinned = _pinned.get()
    return pinned if pinned is not None else _environment_settings()


@functools.cache
def _environment_settings() -> Settings:
    return load_settings()


def forget_settings() -> None:
    """Load the process's settings from the environment again at next use."""
    _environment_settings.cache_clear()


def pin_settings(settings: Settings) -> None:
    """Fix :func:`get_settings` to ``settings`` in the current context and the tasks it starts.

    A Functions host reads its app settings once, at start; a local host that shares its process
    with other code (tests, benchmarks) pins them, so that code pointing the environment at another
    queue or database does not redirect the functions the host is running.
    """
    _pinned.set(settings)


@contextlib.contextmanager
def settings_environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (and the settings cache cleared) for the duration of the block.

    For tests, benchmarks and tools that point the app at another database or queue.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    forget_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        forget_settings()
