"""The local stack: PostgreSQL with pgvector, PgBouncer in transaction mode, and Azurite.

Everything lives under one folder (``.stack/`` for ``make run``, a temporary folder for the
tests): data, configuration, logs, pid files and the Unix socket. ``Stack.up`` is idempotent
and ``Stack.down`` waits until every process it started has exited and its ports are free.

When started as root, PostgreSQL and PgBouncer run as the unprivileged ``recsys`` user, since
both refuse to run as root.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M, DEFAULT_MAINTENANCE_SCHEDULE
from recsys.local import tools
from recsys.local.certs import TlsFiles, write_tls_files
from recsys.local.replicas import Replica, configured_replicas, replicas_on_disk

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "BOUNCER_QUERY_WAIT_TIMEOUT",
    "LOCAL_PASSWORD",
    "MAX_REPLICAS",
    "Stack",
    "StackConfig",
    "free_port",
    "running_stack",
]

log = logging.getLogger("recsys")

#: Development-only password of the local login roles. The local stack is bound to 127.0.0.1.
LOCAL_PASSWORD = "recsys-local"
#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

#: Login roles of the local stack: the app role, plus the least-privilege roles when the
#: migrations define them. Each gets ``LOCAL_PASSWORD`` and a line in PgBouncer's auth file.
LOCAL_LOGIN_ROLES = ("recsys", "recsys_query", "recsys_loader", "recsys_maintainer")

#: Seconds PgBouncer holds a client's query waiting for a server connection (its default is 120,
#: Azure's too) before failing it: while PostgreSQL is down, a statement no client-side bound
#: limits waits this long.
BOUNCER_QUERY_WAIT_TIMEOUT = 30

#: Upper bound of ``StackConfig.replicas``: each standby is a full copy of the database.
MAX_REPLICAS = 8


#: Lowest port ``free_port`` hands out: above the well-known ports of the local stack
#: (5432, 6432, 7071, 10000-10002).
FREE_PORTS_FROM = 20000
_handed_out: set[int] = set()


def _outgoing_ports() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (``ip_local_port_range``)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A port nothing listens on, below the range the kernel draws outgoing connections from.

    A port the kernel hands out for ``bind(0)`` comes from that range, so between this call and
    the server binding it an outgoing connection (to PostgreSQL, PgBouncer, Azurite) could take
    it. Ports below it are only ever taken by a listener, and each is handed out once per process.
    """
    low, _ = _outgoing_ports()
    if low - FREE_PORTS_FROM >= 1000:
        for _ in range(200):
            port = random.randrange(FREE_PORTS_FROM, low)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _scram_secret_of(secret: str | None, password: str) -> bool:
    """Whether ``secret`` (``SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey``) is ``password``'s."""
    try:
        method, params, keys = (secret or "").split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        if method != "SCRAM-SHA-256":
            return False
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return (base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
            and base64.b64encode(hmac.digest(salted, b"Server Key", "sha256")).decode() == server_key)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class StackConfig:
    root: Path
    host: str = "127.0.0.1"
    pg_port: int = 5432
    bouncer_port: int = 6432
    blob_port: int = 10000
    queue_port: int = 10001
    table_port: int = 10002
    database: str = "recsys"
    embedding_dim: int = 384
    #: The embeddings' column type (``None``: ``vector`` up to 2000 dimensions, ``halfvec`` above)
    #: and the HNSW parameters, as ``RECSYS_VECTOR_TYPE``, ``RECSYS_HNSW_M``, ``RECSYS_HNSW_EF_CONSTRUCTION``.
    vector_type: str | None = None
    hnsw_m: int = DEFAULT_HNSW_M
    hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION
    #: ``False`` turns off fsync and friends: for throw-away test stacks.
    durable: bool = True
    #: PgBouncer terminates client TLS (and requires it) with a certificate for ``localhost`` and
    #: ``127.0.0.1`` signed by a CA generated in the stack's folder (``Stack.tls_files``).
    tls: bool = False
    #: PgBouncer's auth file holds the login roles' SCRAM secrets, copied from PostgreSQL, so
    #: it verifies a login without PBKDF2 and passes the client's SCRAM keys on to the server.
    #: ``True`` writes the plain-text password instead (PgBouncer's other way, which derives the
    #: keys with PBKDF2 at every login): only to measure the difference.
    bouncer_plain_passwords: bool = False
    #: Azurite serves HTTPS (the same certificate) and accepts Entra bearer tokens
    #: (``--oauth basic``) besides the account key: for keyless storage.
    storage_oauth: bool = False
    pg_settings: Mapping[str, str] = field(default_factory=dict)
    bouncer_settings: Mapping[str, str] = field(default_factory=dict)
    #: Streaming standbys of PostgreSQL, made with ``pg_basebackup``, each behind a PgBouncer of
    #: its own (``recsys.local.replicas``). The query path then lists them before the primary.
    replicas: int = 0
    #: (PostgreSQL, PgBouncer) ports of each standby; missing ones follow the primary's ports
    #: (standby 1 on ``pg_port + 1`` and ``bouncer_port + 1``, and so on).
    replica_ports: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 0 and {MAX_REPLICAS}, got {self.replicas}")

    def ports_of_replica(self, number: int) -> tuple[int, int]:
        """(PostgreSQL, PgBouncer) ports of standby ``number`` (1, 2, ...)."""
        if number <= len(self.replica_ports):
            return self.replica_ports[number - 1]
        return self.pg_port + number, self.bouncer_port + number

    @classmethod
    def local(cls, root: Path | None = None, **overrides: Any) -> StackConfig:
        """The ``make run`` stack: fixed, well-known ports, data under ``.stack/``."""
        return cls(root=root or tools.project_root() / ".stack", **overrides)

    @classmethod
    def ephemeral(cls, root: Path, **overrides: Any) -> StackConfig:
        """A stack on free ports, so that several can run on one machine (tests, benchmarks)."""
        ports: dict[str, Any] = {
            "pg_port": free_port(),
            "bouncer_port": free_port(),
            "blob_port": free_port(),
            "queue_port": free_port(),
            "table_port": free_port(),
        }
        ports.update(overrides)
        if "replica_ports" not in overrides:
            count = int(overrides.get("replicas", 0))
            ports["replica_ports"] = tuple((free_port(), free_port()) for _ in range(count))
        return cls(root=root, **{"durable": False, **ports})


class Stack:
    """Start, stop and describe the local stack of one :class:`StackConfig`."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.root.resolve()
        self.pg_dir = self.root / "postgres"
        self.pg_data = self.pg_dir / "data"
        self.run_dir = self.root / "run"
        self.bouncer_dir = self.root / "pgbouncer"
        self.azurite_dir = self.root / "azurite"
        self.tls_dir = self.root / "tls"

    @property
    def tls_files(self) -> TlsFiles:
        """The stack's CA and PgBouncer's server certificate (generated on first use)."""
        return write_tls_files(self.tls_dir)

    # ----------------------------------------------------------------- addresses

    def direct_url(self, user: str = "recsys", password: str = LOCAL_PASSWORD, database: str | None = None) -> str:
        """libpq URL straight to PostgreSQL over TCP (password authentication, SCRAM)."""
        c = self.config
        return f"postgresql://{user}:{password}@{c.host}:{c.pg_port}/{database or c.database}"

    def bouncer_url(self, user: str = "recsys", password: str = LOCAL_PASSWORD, database: str | None = None) -> str:
        """libpq URL through PgBouncer, as the functions connect."""
        c = self.config
        return f"postgresql://{user}:{password}@{c.host}:{c.bouncer_port}/{database or c.database}"

    def query_url(self, user: str = "recsys_query", password: str = LOCAL_PASSWORD) -> str:
        """libpq URL of the query path: the standbys' PgBouncers, then the primary's.

        Without standbys, the primary's PgBouncer. With them, libpq's multi-host syntax:
        ``target_session_attrs=prefer-standby`` takes a standby whenever one answers and the
        primary otherwise; ``load_balance_hosts=random`` spreads connections over the standbys.
        """
        c = self.config
        replicas = self.replicas()
        if not replicas:
            return self.bouncer_url(user=user, password=password)
        hosts = ",".join(f"{c.host}:{port}" for port in [*(r.bouncer_port for r in replicas), c.bouncer_port])
        return (
            f"postgresql://{user}:{password}@{hosts}/{c.database}"
            "?target_session_attrs=prefer-standby&load_balance_hosts=random"
        )

    def bouncer_admin_url(self, user: str = "recsys") -> str:
        """PgBouncer's admin console (``SHOW POOLS`` and friends); ``recsys`` may read it."""
        return self.bouncer_url(user=user, database="pgbouncer")

    def admin_conninfo(self, database: str | None = None, port: int | None = None) -> str:
        """Superuser over the Unix socket: for migrations and the stack's own bootstrap.

        ``port`` selects another server of the stack (a standby; they share the socket folder).
        """
        c = self.config
        return f"host={self.run_dir} port={port or c.pg_port} user=postgres dbname={database or c.database}"

    def storage_connection_string(self) -> str:
        c = self.config
        default_ports = (c.blob_port, c.queue_port, c.table_port) == (10000, 10001, 10002)
        if default_ports and c.host == "127.0.0.1" and not c.storage_oauth:
            return "UseDevelopmentStorage=true"
        return (
            f"DefaultEndpointsProtocol={self._storage_scheme};AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.storage_service_uri('blob')};QueueEndpoint={self.storage_service_uri('queue')};"
        )

    @property
    def _storage_scheme(self) -> str:
        return "https" if self.config.storage_oauth else "http"

    def storage_service_uri(self, service: str) -> str:
        """Azurite's ``blob`` or ``queue`` service URL for the development account."""
        c = self.config
        port = c.blob_port if service == "blob" else c.queue_port
        return f"{self._storage_scheme}://{c.host}:{port}/{AZURITE_ACCOUNT}"

    def storage_identity_environment(self, connection: str = "AzureWebJobsStorage") -> dict[str, str]:
        """Keyless settings of ``connection`` for this Azurite (needs ``storage_oauth``)."""
        if not self.config.storage_oauth:
            raise RuntimeError("keyless storage needs StackConfig(storage_oauth=True)")
        return {
            f"{connection}__queueServiceUri": self.storage_service_uri("queue"),
            f"{connection}__blobServiceUri": self.storage_service_uri("blob"),
            f"{connection}__credential": "managedidentity",
        }

    def app_environment(self) -> dict[str, str]:
        """The settings (``API.md``) that point the function app at this stack.

        The query path connects as ``recsys_query`` and the ingest path as ``recsys_loader``
        (``sql/030_roles.sql``), both through PgBouncer; with ``tls`` in ``verify-full`` mode.
        With standbys, the query path lists them before the primary (``query_url``); the ingest
        path (loader, ledger, batch status, calibration) stays on the primary.
        """
        env = {
            "RECSYS_DATABASE_URL": self.query_url(),
            "RECSYS_LOADER_DATABASE_URL": self.bouncer_url(user="recsys_loader"),
            "RECSYS_MAINTENANCE_DATABASE_URL": self.bouncer_url(user="recsys_maintainer"),
            "RECSYS_DB_AUTH": "password",
            "RECSYS_EMBEDDING_DIM": str(self.config.embedding_dim),
            "RECSYS_HNSW_M": str(self.config.hnsw_m),
            "RECSYS_HNSW_EF_CONSTRUCTION": str(self.config.hnsw_ef_construction),
            "AzureWebJobsStorage": self.storage_connection_string(),
            # The loader's queue trigger binds %RECSYS_QUEUE_NAME%: a binding expression needs
            # the app setting itself, a default in Settings is not enough.
            "RECSYS_QUEUE_NAME": "embedding-batches",
            # The same for the housekeeping timer's %RECSYS_MAINTENANCE_SCHEDULE%.
            "RECSYS_MAINTENANCE_SCHEDULE": DEFAULT_MAINTENANCE_SCHEDULE,
        }
        if self.config.vector_type:
            env["RECSYS_VECTOR_TYPE"] = self.config.vector_type
        if self.config.tls:
            env["RECSYS_SSLMODE"] = "verify-full"
            env["RECSYS_SSLROOTCERT"] = str(self.tls_files.ca_cert)
        return env

    # ----------------------------------------------------------------- lifecycle

    def up(self, *, migrate: bool = True) -> None:
        """Start whatever is not running, bootstrap the database, apply migrations."""
        tools.ensure_tools()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._make_reachable()
        self.start_postgres()
        self._bootstrap()
        if migrate:
            self.migrate()
        self._set_local_passwords()
        if self.pgbouncer_running():
            # Setting a password again gives it a new salt: PgBouncer needs the new secrets.
            self.reload_pgbouncer()
        self.start_pgbouncer()
        wanted = self.replicas()
        for replica in wanted:
            replica.up()
        numbers = {replica.number for replica in wanted}
        for replica in self.replicas_on_disk():
            if replica.number not in numbers and (replica.postgres_running() or replica.pgbouncer_running()):
                # Kept on disk: it catches up through its slot when asked for again.
                log.info("stopping %s (the stack runs %d standbys)", replica.name, len(wanted))
                replica.down()
        self.start_azurite()
        (self.root / "stack.json").write_text(json.dumps(self.describe(), indent=2))

    def down(self) -> None:
        """Stop every process of the stack (standbys included) and wait until its ports are free."""
        self.stop_azurite()
        for replica in self.replicas_on_disk():
            replica.down()
        self.stop_pgbouncer()
        self.stop_postgres()

    def replicas(self) -> list[Replica]:
        """The standbys the configuration asks for (``StackConfig.replicas``)."""
        return configured_replicas(self)

    def replicas_on_disk(self) -> list[Replica]:
        """Every standby made in the stack's folder, running or not."""
        return replicas_on_disk(self)

    def status(self) -> dict[str, bool]:
        status = {
            "postgres": self.postgres_running(),
            "pgbouncer": self.pgbouncer_running(),
            "azurite": self.azurite_running(),
        }
        for replica in self.replicas_on_disk():
            status.update(replica.status())
        return status

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "postgres": self.direct_url(),
            "pgbouncer": self.bouncer_url(),
            "pgbouncer_admin": self.bouncer_admin_url(),
            "query": self.query_url(),
            "replicas": {replica.name: replica.describe() for replica in self.replicas_on_disk()},
            "storage": self.storage_connection_string(),
            "tls_ca": str(self.tls_files.ca_cert) if self.config.tls else None,
            "status": self.status(),
        }

    def migrate(self) -> list[str]:
        from recsys.db.migrations import apply_migrations

        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            return apply_migrations(
                conn, embedding_dim=self.config.embedding_dim, vector_type=self.config.vector_type,
                hnsw_m=self.config.hnsw_m, hnsw_ef_construction=self.config.hnsw_ef_construction,
            )

    # ----------------------------------------------------------------- PostgreSQL

    def _service_user(self) -> pwd.struct_passwd | None:
        return tools.ensure_service_user()

    def _as_service(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        user = self._service_user()
        extra: dict[str, Any] = {}
        env = dict(os.environ)
        if user is not None:
            extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.root)
        return subprocess.run(cmd, text=True, capture_output=True, env=env, check=False, **extra, **kwargs)

    def _chown(self, *paths: Path) -> None:
        user = self._service_user()
        if user is None:
            return
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _make_reachable(self) -> None:
        """Let the service user reach the stack folder and the PostgreSQL binaries.

        A checkout under a private folder (mode 0700) would hide them; granting search
        permission (``o+x``, not read) on the folders above is enough.
        """
        if self._service_user() is None:
            return
        for target in (self.root, tools.pg_bin("postgres").parents[1]):
            for folder in [target, *target.parents]:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    log.info("granting search permission on %s to the service user", folder)
                    os.chmod(folder, mode | stat.S_IXOTH)

    def postgres_running(self) -> bool:
        return self._postgres_running_in(self.pg_data)

    def _postgres_running_in(self, data_dir: Path) -> bool:
        if not (data_dir / "PG_VERSION").exists():
            return False
        result = self._as_service([str(tools.pg_bin("pg_ctl")), "status", "-D", str(data_dir)])
        return result.returncode == 0

    def _write_postgres_conf(self, data_dir: Path | None = None, port: int | None = None) -> None:
        """The stack's ``recsys.conf`` in ``data_dir`` (the primary's by default), for ``port``.

        Standbys get the same settings: a hot standby needs ``max_connections`` and friends at
        least as large as its primary's.
        """
        c = self.config
        data_dir = data_dir or self.pg_data
        settings: dict[str, str] = {
            "listen_addresses": f"'{c.host}'",
            "port": str(port or c.pg_port),
            "unix_socket_directories": f"'{self.run_dir}'",
            "max_connections": "100",
            "shared_buffers": "'256MB'",
            "maintenance_work_mem": "'512MB'",
            "max_parallel_maintenance_workers": "2",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            "log_connections": "off",
            # Streaming standbys (recsys.local.replicas): each holds a replication slot, bounded so
            # that a standby left stopped cannot fill the primary's disk with WAL.
            "max_slot_wal_keep_size": "'2GB'",
            # Ignored by a primary. On a standby: the primary keeps the rows a running query still
            # reads, instead of the standby cancelling the query when it replays their removal.
            "hot_standby_feedback": "on",
            # A standby whose primary restarted reconnects within a second (default 5 s).
            "wal_retrieve_retry_interval": "'1s'",
        }
        if not c.durable:
            settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        settings.update(c.pg_settings)
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        conf = data_dir / "recsys.conf"
        conf.write_text("# Written by recsys.local.stack at every start.\n" + text)
        self._chown(conf)

    def start_postgres(self) -> None:
        self._make_reachable()  # again: a restart may come after something tightened a parent folder
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.pg_dir, self.run_dir)
        os.chmod(self.run_dir, 0o755)
        if not (self.pg_data / "PG_VERSION").exists():
            result = self._as_service([
                str(tools.pg_bin("initdb")), "-D", str(self.pg_data), "-U", "postgres", "-E", "UTF8",
                "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
            ])
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed: {result.stderr or result.stdout}")
            with (self.pg_data / "postgresql.conf").open("a") as conf:
                conf.write("\ninclude_if_exists = 'recsys.conf'\n")
        self._start_postgres_in(self.pg_data, self.config.pg_port, self.pg_dir / "postgres.log")

    def _start_postgres_in(self, data_dir: Path, port: int, log_file: Path) -> None:
        if self._postgres_running_in(data_dir):
            return
        self._write_postgres_conf(data_dir, port)
        result = self._as_service([
            str(tools.pg_bin("pg_ctl")), "start", "-D", str(data_dir), "-l", str(log_file), "-w", "-t", "60",
        ])
        if result.returncode != 0:
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr or result.stdout}\n{tail}")

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop PostgreSQL: ``fast`` (roll back and disconnect clients) or ``immediate`` (a crash:
        no shutdown checkpoint, recovery at the next start), as ``pg_ctl stop -m``."""
        self._stop_postgres_in(self.pg_data, self.config.pg_port, mode)

    def _stop_postgres_in(self, data_dir: Path, port: int, mode: str = "fast") -> None:
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if not self._postgres_running_in(data_dir):
            return
        self._as_service([str(tools.pg_bin("pg_ctl")), "stop", "-D", str(data_dir), "-m", mode, "-w", "-t", "60"])
        self._wait_port_closed(port)

    def _bootstrap(self) -> None:
        """Create the database and the app role on a new cluster (the migrations do the rest)."""
        with psycopg.connect(self.admin_conninfo("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'recsys'").fetchone():
                conn.execute("CREATE ROLE recsys LOGIN")
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.config.database]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER recsys").format(sql.Identifier(self.config.database)))

    def _existing_login_roles(self, port: int | None = None) -> list[str]:
        """Login roles of the server on ``port`` (the primary by default; a standby has the same)."""
        with psycopg.connect(self.admin_conninfo(port=port), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname", [list(LOCAL_LOGIN_ROLES)]
            ).fetchall()
        return [row[0] for row in rows]

    def _set_local_passwords(self) -> None:
        """Give the login roles the local password, unless their SCRAM secret already is of it.

        Setting it again would draw a new salt, hence a new secret, and PgBouncers (the
        primary's and the standbys') hold the secrets they read at start.
        """
        with psycopg.connect(self.admin_conninfo(), autocommit=True) as conn:
            stored: dict[str, str | None] = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid").fetchall())
            for role in ["postgres", *self._existing_login_roles()]:
                if _scram_secret_of(stored.get(role), LOCAL_PASSWORD):
                    continue
                conn.execute(
                    sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(LOCAL_PASSWORD))
                )

    # ----------------------------------------------------------------- PgBouncer

    @property
    def bouncer_pidfile(self) -> Path:
        return self.bouncer_dir / "pgbouncer.pid"

    def pgbouncer_running(self) -> bool:
        return self._pgbouncer_running_in(self.bouncer_dir)

    def _pgbouncer_running_in(self, bouncer_dir: Path) -> bool:
        pid = _read_pid(bouncer_dir / "pgbouncer.pid")
        return pid is not None and _pid_alive(pid)

    def _bouncer_secrets(self, server_port: int | None = None) -> dict[str, str]:
        """The lines of PgBouncer's auth file: role -> SCRAM secret (or password).

        A SCRAM secret (``SCRAM-SHA-256$4096:salt$StoredKey:ServerKey``, as in ``pg_authid``) lets
        PgBouncer check a client's proof with two HMACs instead of deriving the keys from a
        password with 4096 rounds of PBKDF2 at every login, which is what saturates it when
        hundreds of instances log in at once. It also hands the client's keys on to PostgreSQL
        for the server login, which works because the secret is PostgreSQL's own (a standby has
        the primary's). ``postgres`` keeps its password: it is PgBouncer's ``auth_user`` where
        ``auth_query`` is used, and PgBouncer must log in as it without a client's keys.
        """
        roles = self._existing_login_roles(server_port)
        with psycopg.connect(self.admin_conninfo(port=server_port), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s) AND rolpassword IS NOT NULL",
                [roles],
            ).fetchall()
        secrets = {"postgres": LOCAL_PASSWORD}
        for role, secret in sorted(rows):
            secrets[role] = LOCAL_PASSWORD if self.config.bouncer_plain_passwords else str(secret)
        return secrets

    def _write_pgbouncer_conf(
        self, bouncer_dir: Path | None = None, listen_port: int | None = None, server_port: int | None = None
    ) -> Path:
        """PgBouncer's configuration in ``bouncer_dir``, listening on ``listen_port`` in front of
        the server on ``server_port``: the primary's by default, a standby's for its own PgBouncer
        (same authentication, same pool settings)."""
        c = self.config
        bouncer_dir = bouncer_dir or self.bouncer_dir
        listen_port = listen_port or c.bouncer_port
        server_port = server_port or c.pg_port
        userlist = bouncer_dir / "userlist.txt"
        secrets = self._bouncer_secrets(server_port)
        userlist.write_text("".join(f'"{role}" "{secret}"\n' for role, secret in secrets.items()))
        os.chmod(userlist, 0o600)
        settings: dict[str, str] = {
            "listen_addr": c.host,
            "listen_port": str(listen_port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(userlist),
            "pool_mode": "transaction",
            "max_client_conn": "2000",
            "default_pool_size": "20",
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_db_connections": "40",
            # Report a failed server login to waiting clients quickly instead of queueing them.
            "server_login_retry": "1",
            "query_wait_timeout": str(BOUNCER_QUERY_WAIT_TIMEOUT),
            "server_connect_timeout": "5",
            # Fresh SHOW STATS totals (default: every 60 s), without a log line each period.
            "stats_period": "1",
            "log_stats": "0",
            "admin_users": "postgres",
            "stats_users": "recsys",
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(bouncer_dir / "pgbouncer.log"),
            "pidfile": str(bouncer_dir / "pgbouncer.pid"),
        }
        if c.tls:
            files = self.tls_files
            self._chown(files.server_key)
            settings.update({
                # Clients must use TLS; PostgreSQL behind it is on the same host (and has no TLS).
                "client_tls_sslmode": "require",
                "client_tls_key_file": str(files.server_key),
                "client_tls_cert_file": str(files.server_cert),
                "client_tls_ca_file": str(files.ca_cert),
                "server_tls_sslmode": "disable",
            })
        settings.update(c.bouncer_settings)
        ini = bouncer_dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{c.database} = host={c.host} port={server_port} dbname={c.database}\n"
            f"* = host={c.host} port={server_port}\n\n"
            "[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        self._chown(userlist, ini)
        return ini

    def start_pgbouncer(self) -> None:
        self._make_reachable()  # again: a restart may come after something tightened a parent folder
        self._start_pgbouncer_in(self.bouncer_dir, self.config.bouncer_port, self.config.pg_port)

    def _start_pgbouncer_in(self, bouncer_dir: Path, listen_port: int, server_port: int) -> None:
        bouncer_dir.mkdir(parents=True, exist_ok=True)
        self._chown(bouncer_dir)
        pid = _read_pid(bouncer_dir / "pgbouncer.pid")
        if pid is not None and _pid_alive(pid):
            return
        ini = self._write_pgbouncer_conf(bouncer_dir, listen_port, server_port)
        binary = tools.ensure_pgbouncer()
        cmd = [str(binary), "-d", str(ini)]
        user = self._service_user()
        if user is not None:
            cmd[1:1] = ["-u", user.pw_name]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"PgBouncer did not start: {result.stderr or result.stdout}")
        self._wait_port_open(listen_port, "PgBouncer")

    def reload_pgbouncer(self) -> None:
        """Rewrite the configuration of every PgBouncer of the stack (the primary's and each
        standby's) and make the running processes read it (SIGHUP)."""
        targets = [(self.bouncer_dir, self.config.bouncer_port, self.config.pg_port)]
        targets += [(r.bouncer_dir, r.bouncer_port, r.pg_port) for r in self.replicas_on_disk()]
        for bouncer_dir, listen_port, server_port in targets:
            if not bouncer_dir.exists():
                continue
            self._write_pgbouncer_conf(bouncer_dir, listen_port, server_port)
            pid = _read_pid(bouncer_dir / "pgbouncer.pid")
            if pid is not None and _pid_alive(pid):
                os.kill(pid, signal.SIGHUP)

    def stop_pgbouncer(self) -> None:
        self._stop_pgbouncer_in(self.bouncer_dir, self.config.bouncer_port)

    def _stop_pgbouncer_in(self, bouncer_dir: Path, listen_port: int) -> None:
        self._stop_pidfile(bouncer_dir / "pgbouncer.pid", signal.SIGTERM)
        self._wait_port_closed(listen_port)

    # ----------------------------------------------------------------- Azurite

    @property
    def azurite_pidfile(self) -> Path:
        return self.azurite_dir / "azurite.pid"

    def azurite_running(self) -> bool:
        pid = _read_pid(self.azurite_pidfile)
        return pid is not None and _pid_alive(pid)

    def start_azurite(self) -> None:
        if self.azurite_running():
            return
        self.azurite_dir.mkdir(parents=True, exist_ok=True)
        c = self.config
        binary = tools.ensure_azurite()
        cmd = [
            str(binary), "--silent", "--skipApiVersionCheck", "--loose", "--disableProductStyleUrl",
            "--location", str(self.azurite_dir / "data"),
            "--blobHost", c.host, "--blobPort", str(c.blob_port),
            "--queueHost", c.host, "--queuePort", str(c.queue_port),
            "--tableHost", c.host, "--tablePort", str(c.table_port),
        ]
        if c.storage_oauth:
            # Bearer tokens only over HTTPS; "basic" checks issuer, audience and lifetime.
            files = self.tls_files
            cmd += ["--oauth", "basic", "--cert", str(files.server_cert), "--key", str(files.server_key)]
        with (self.azurite_dir / "azurite.log").open("ab") as out:
            # A session of its own, so that stopping it also stops the node process behind the shim.
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.azurite_pidfile.write_text(str(process.pid))
        self._wait_port_open(c.queue_port, "Azurite", process=process)
        self._wait_port_open(c.blob_port, "Azurite", process=process)

    def stop_azurite(self) -> None:
        self._stop_pidfile(self.azurite_pidfile, signal.SIGTERM, group=True)
        for port in (self.config.blob_port, self.config.queue_port, self.config.table_port):
            self._wait_port_closed(port)

    # ----------------------------------------------------------------- helpers

    def _stop_pidfile(self, pidfile: Path, sig: signal.Signals, *, group: bool = False) -> None:
        pid = _read_pid(pidfile)
        if pid is None or not _pid_alive(pid):
            pidfile.unlink(missing_ok=True)
            return
        kill = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError):
            kill(pid, sig)
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
        pidfile.unlink(missing_ok=True)

    def _wait_port_open(self, port: int, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + 60
        while not _port_open(self.config.host, port):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}; see its log under {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not open port {port} within 60 s")
            time.sleep(0.05)

    def _wait_port_closed(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while _port_open(self.config.host, port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} is still open after stopping the stack")
            time.sleep(0.05)


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[Stack]:
    """A stack that is up for the duration of the block and down after it, whatever happens."""
    stack = Stack(config)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
