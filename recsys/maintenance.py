"""Housekeeping: keeps the service's own bookkeeping bounded (``python -m recsys maintain``).

One run, as the ``maintenance_timer`` function does on ``RECSYS_MAINTENANCE_SCHEDULE``, over the
``maintenance`` pool (role ``recsys_maintainer``, ``sql/058_maintenance_role.sql``):

1. ledger parts still ``queued`` whose message cannot arrive any more (no update for longer
   than a queue message lives, 7 days, plus the loader's retry window) become ``failed``;
2. batches whose parts are all ``loaded`` or ``failed`` and were last updated before
   ``RECSYS_LEDGER_RETENTION_DAYS`` are deleted, all parts at once;
3. deletion memories (``item_tombstones``) older than ``RECSYS_TOMBSTONE_RETENTION_DAYS``;
4. claim-check blobs of ``RECSYS_BLOB_CONTAINER`` older than the ledger retention: no message
   points at them any more (a queued message lives 7 days, a poisoned one as long as the ledger
   retention, and the loader deletes a part's blob as soon as the part has loaded);
5. recall calibrations older than the ledger retention, except the latest;
6. a fresh recall calibration (``recsys.search.calibration.calibrate``) when more than a tenth of
   the catalogue changed since the latest one (rows written or deleted since, or the size moved
   by more than a tenth), or when there is none and the catalogue can be calibrated;
7. the filter indexes whose copy is due to be built again (more than a tenth of its members
   changed since it was built: ``recsys.search.filter_indexes.refresh_reason``) are named, with a
   warning: the build needs the table's owner on a direct connection, ``python -m recsys
   filter-index refresh``, which this run's role and pool are not; so are, for the indexed fields
   (``filter-index create --every-tag``), the values that have reached their rule's bound without
   a filter index, and the filter indexes a rule made whose value fell below half of it
   (``recsys.search.filter_indexes.FIELD_PLAN``).

Every cut-off is computed from one ``now``, so a run is reproducible; the run is logged with
what it did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from recsys.config import Settings, get_settings

__all__ = ["MESSAGE_LIFETIME", "RECALIBRATE_FRACTION", "Report", "housekeeping", "maintain_main"]

log = logging.getLogger("recsys")

#: A queue message's default lifetime (Azure Storage): after it, a queued part has no message.
MESSAGE_LIFETIME = timedelta(days=7)
#: Share of the catalogue that must have changed since the latest calibration to recalibrate.
RECALIBRATE_FRACTION = 0.1

_FAIL_STALE = """
UPDATE ingest_batches SET status = 'failed', updated_at = %(now)s,
       error = 'no message arrived for this part before its message could have expired; send the batch again'
 WHERE status = 'queued' AND updated_at < %(cutoff)s
"""

# Whole batches only: a batch's status is computed over its parts.
_PRUNE_LEDGER = """
DELETE FROM ingest_batches
 WHERE batch_id IN (SELECT batch_id FROM ingest_batches GROUP BY batch_id
                     HAVING max(updated_at) < %(cutoff)s AND bool_and(status <> 'queued'))
"""

_PRUNE_TOMBSTONES = "DELETE FROM item_tombstones WHERE deleted_at < %(cutoff)s"

_PRUNE_CALIBRATIONS = """
DELETE FROM recall_calibrations
 WHERE measured_at < %(cutoff)s AND id <> (SELECT max(id) FROM recall_calibrations)
"""

_LATEST_CALIBRATION = "SELECT measured_at, catalogue_size FROM recall_calibrations ORDER BY id DESC LIMIT 1"

_CHANGES_SINCE = """
SELECT (SELECT count(*) FROM items),
       (SELECT count(*) FROM items WHERE updated_at > %(since)s),
       (SELECT count(*) FROM item_tombstones WHERE deleted_at > %(since)s)
"""


@dataclass
class Report:
    """What one run did."""

    started_at: str
    failed_stale_parts: int = 0
    ledger_rows_deleted: int = 0
    tombstones_deleted: int = 0
    blobs_deleted: int = 0
    calibrations_deleted: int = 0
    recalibrated: bool = False
    recalibration_reason: str | None = None
    filter_indexes_due: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _execute(conn: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any]) -> int:
    cur = await conn.execute(statement, params)
    return max(cur.rowcount, 0)


async def _prune_blobs(settings: Settings, cutoff: datetime) -> int:
    from azure.core.exceptions import ResourceNotFoundError

    from recsys.ingest.clients import blob_service

    deleted = 0
    async with blob_service(settings.storage) as service:
        container = service.get_container_client(settings.blob_container)
        try:
            names = [b.name async for b in container.list_blobs() if b.last_modified < cutoff]
        except ResourceNotFoundError:
            return 0
        for name in names:
            try:
                await container.delete_blob(name)
                deleted += 1
            except ResourceNotFoundError:
                pass
    return deleted


async def _recalibration_reason(conn: psycopg.AsyncConnection[Any]) -> str | None:
    latest = await (await conn.execute(_LATEST_CALIBRATION)).fetchone()
    since = latest[0] if latest else datetime(1970, 1, 1, tzinfo=UTC)
    row = await (await conn.execute(_CHANGES_SINCE, {"since": since})).fetchone()
    assert row is not None
    size, written, deleted = (int(v) for v in row)
    if latest is None:
        return f"no calibration yet; the catalogue holds {size} items" if size else None
    calibrated_size = int(latest[1])
    changed = max(abs(size - calibrated_size), written + deleted)
    if changed > RECALIBRATE_FRACTION * max(calibrated_size, 1):
        return (f"{changed} of {calibrated_size} items changed since the calibration of "
                f"{latest[0].isoformat()} ({written} written, {deleted} deleted, now {size})")
    return None


async def housekeeping(settings: Settings | None = None, *, now: datetime | None = None) -> Report:
    """Run every step once (see the module docstring); return and log what was done.

    A step that fails is reported in ``errors`` and the others still run.
    """
    from recsys.db.pool import get_pool
    from recsys.db.retry import checked_connection
    from recsys.search.calibration import CalibrationError, calibrate
    from recsys.search.filter_indexes import DRIFT, DRIFT_PARAMS, FIELD_PLAN, field_plan_reason, filter_indexes_due

    settings = settings or get_settings()
    now = now or datetime.now(UTC)
    report = Report(started_at=now.isoformat())
    ledger_cutoff = now - timedelta(days=settings.ledger_retention_days)
    stale_cutoff = now - MESSAGE_LIFETIME - timedelta(hours=settings.loader_retry_window_hours)
    pool = await get_pool("maintenance", settings)
    # Each connection is checked first (checked_connection): while PostgreSQL is down, a statement
    # would wait out PgBouncer's query_wait_timeout (120 s on Azure).
    steps = [
        ("failed_stale_parts", _FAIL_STALE, {"now": now, "cutoff": stale_cutoff}),
        ("ledger_rows_deleted", _PRUNE_LEDGER, {"cutoff": ledger_cutoff}),
        ("tombstones_deleted", _PRUNE_TOMBSTONES,
         {"cutoff": now - timedelta(days=settings.tombstone_retention_days)}),
        ("calibrations_deleted", _PRUNE_CALIBRATIONS, {"cutoff": ledger_cutoff}),
    ]
    try:
        async with checked_connection(pool, settings) as conn:
            for name, statement, params in steps:
                try:
                    setattr(report, name, await _execute(conn, statement, params))
                except psycopg.Error as exc:
                    report.errors.append(f"{name}: {exc}")
    except psycopg.Error as exc:  # no connection: none of the steps ran
        report.errors.extend(f"{name}: {exc}" for name, _, _ in steps)
    try:
        report.blobs_deleted = await _prune_blobs(settings, ledger_cutoff)
    except Exception as exc:  # storage unreachable: the next run catches up
        report.errors.append(f"blobs_deleted: {exc}")
    try:
        async with checked_connection(pool, settings) as conn:
            reason = await _recalibration_reason(conn)
            if reason is not None:
                report.recalibration_reason = reason
                await calibrate(conn)
                report.recalibrated = True
    except CalibrationError as exc:
        report.errors.append(f"recalibration: {exc}")
    except psycopg.Error as exc:
        report.errors.append(f"recalibration: {exc}")
    try:
        async with checked_connection(pool, settings) as conn:
            drift = await (await conn.execute(DRIFT, DRIFT_PARAMS)).fetchall()
            plan = await (await conn.execute(FIELD_PLAN)).fetchall()
        for kind, value, reason in filter_indexes_due(drift):
            report.filter_indexes_due.append(f"{kind} {value!r}: {reason}")
            log.warning("the copy of the filter index of %s %r is due to be built again (%s):"
                        " python -m recsys filter-index refresh --%s %s", kind, value, reason, kind, shlex.quote(value))
        for action, kind, key, value, members, bound in plan:
            reason = field_plan_reason(action, kind, key, value, members, bound)
            report.filter_indexes_due.append(f"{kind} {value!r}: to {action}, {reason}")
            log.warning("the filter index of %s %r is due to be %s (%s): python -m recsys filter-index refresh",
                        kind, value, "built" if action == "create" else "dropped", reason)
    except psycopg.Error as exc:
        report.errors.append(f"filter_indexes_due: {exc}")
    log.info("housekeeping: %s", json.dumps(report.to_dict()))
    return report


def maintain_main(argv: list[str]) -> int:
    """``python -m recsys maintain``: one housekeeping run against the configured database."""
    parser = argparse.ArgumentParser(prog="python -m recsys maintain", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> Report:
        from recsys.db.pool import close_pools

        try:
            return await housekeeping()
        finally:
            await close_pools()

    report = asyncio.run(main())
    print(json.dumps(report.to_dict(), indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(maintain_main(sys.argv[1:]))
