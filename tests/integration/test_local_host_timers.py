"""Timer triggers in the local host: fired from their NCRONTAB schedule, with the host's monitor."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest
from azure.storage.blob import BlobServiceClient

from recsys.config import settings_environment
from recsys.local.host import FunctionHost, HostConfig, TimerDriver


def timer_app(fired: list[Any], schedule: str, **options: Any) -> func.FunctionApp:
    app = func.FunctionApp()

    @app.timer_trigger(arg_name="timer", schedule=schedule, **options)
    async def tick(timer: func.TimerRequest) -> None:
        fired.append((datetime.now(UTC), timer.past_due, dict(timer.schedule_status)))

    return app


async def test_a_timer_fires_every_second_from_its_ncrontab_schedule(stack_env: dict[str, str]) -> None:
    fired: list[Any] = []
    with settings_environment({"TEST_TICK_SCHEDULE": "* * * * * *"}):
        host = FunctionHost(timer_app(fired, "%TEST_TICK_SCHEDULE%"), HostConfig(), run_queues=False, run_timers=True)
        await host.start()
        try:
            await asyncio.sleep(3.4)
        finally:
            await host.stop()
    assert 3 <= len(fired) <= 4, fired
    times = [t for t, _, _ in fired]
    # Each run starts on (just after) a whole second, one second apart, and is not past due.
    assert all(t.microsecond < 800_000 for t in times), times
    assert all(0.5 < (b - a).total_seconds() < 1.5 for a, b in itertools.pairwise(times))
    assert not any(past_due for _, past_due, _ in fired)


async def test_run_on_startup_runs_once_at_start(stack_env: dict[str, str]) -> None:
    fired: list[Any] = []
    host = FunctionHost(
        timer_app(fired, "0 0 0 1 1 *", run_on_startup=True), HostConfig(), run_queues=False, run_timers=True
    )
    await host.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await host.stop()
    assert len(fired) == 1 and fired[0][1] is False


async def test_the_monitor_runs_a_missed_occurrence_at_start_as_past_due(stack_env: dict[str, str]) -> None:
    name = f"tick{uuid.uuid4().hex[:8]}"
    fired: list[Any] = []
    app = func.FunctionApp()

    @app.function_name(name)
    @app.timer_trigger(arg_name="timer", schedule="0 0 3 * * *", use_monitor=True)
    async def tick(timer: func.TimerRequest) -> None:
        fired.append((timer.past_due, dict(timer.schedule_status)))

    (function,) = FunctionHost(app, run_queues=False).timer_functions
    missed = datetime.now(UTC) - timedelta(hours=1)
    blobs = BlobServiceClient.from_connection_string(stack_env["AzureWebJobsStorage"])
    status = f"timers/{TimerDriver.HOST_ID}/{name}/status"
    try:
        blob = blobs.get_blob_client(TimerDriver.CONTAINER, status)
        if not blobs.get_container_client(TimerDriver.CONTAINER).exists():
            blobs.create_container(TimerDriver.CONTAINER)
        blob.upload_blob(json.dumps({"Last": None, "Next": missed.isoformat(), "LastUpdated": None}), overwrite=True)

        driver = TimerDriver(function)
        assert driver.use_monitor
        task = asyncio.create_task(driver.run())
        await asyncio.sleep(1.0)
        driver.stop()
        await task
        assert len(fired) == 1 and fired[0][0] is True
        # The status now says when the next occurrence is: tomorrow's (or today's) 03:00.
        recorded = json.loads(blob.download_blob().readall())
        upcoming = datetime.fromisoformat(recorded["Next"].replace("Z", "+00:00"))
        assert (upcoming.hour, upcoming.minute, upcoming.second) == (3, 0, 0)
        assert timedelta(0) < upcoming - datetime.now(UTC) <= timedelta(days=1)
        assert recorded["Last"] is not None

        # Started again before that occurrence: nothing is due, nothing runs.
        driver = TimerDriver(function)
        task = asyncio.create_task(driver.run())
        await asyncio.sleep(0.5)
        driver.stop()
        await task
        assert len(fired) == 1
    finally:
        blobs.get_blob_client(TimerDriver.CONTAINER, status).delete_blob()
        blobs.close()


def test_an_unset_schedule_setting_is_refused_at_start(stack_env: dict[str, str]) -> None:
    host = FunctionHost(timer_app([], "%TEST_NO_SUCH_SCHEDULE%"), run_queues=False, run_timers=True)
    (function,) = host.timer_functions
    with pytest.raises(KeyError, match="TEST_NO_SUCH_SCHEDULE"):
        TimerDriver(function)
