"""The housekeeping timer: ``recsys.maintenance.housekeeping`` on ``%RECSYS_MAINTENANCE_SCHEDULE%``."""

from __future__ import annotations

import logging

import azure.functions as func

from recsys.maintenance import housekeeping
from recsys.telemetry import invocation_span

__all__ = ["bp"]

log = logging.getLogger("recsys")

bp = func.Blueprint()


# The schedule is an app setting (NCRONTAB, UTC), so it must be set wherever the app runs, as
# RECSYS_QUEUE_NAME must. use_monitor: an occurrence missed while the app was down runs when it
# starts again; run_on_startup stays off (every scale-out or restart would run it).
@bp.timer_trigger(arg_name="timer", schedule="%RECSYS_MAINTENANCE_SCHEDULE%", run_on_startup=False, use_monitor=True)
@invocation_span
async def maintenance_timer(timer: func.TimerRequest) -> None:
    """Run housekeeping once; the run logs what it did (``housekeeping: {...}``)."""
    if timer.past_due:
        log.info("housekeeping is past due (the app was down at its scheduled time)")
    await housekeeping()
