"""The local host serves concurrently and drives queue triggers from Azurite as Azure does."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import azure.functions as func
import httpx
import pytest
from azure.storage.queue import QueueClient
from faults_support import wait_until_healthy

from recsys.local.host import FunctionHost, HostConfig, QueueOptions, serve_in_thread
from recsys.local.stack import Stack, free_port

pytestmark = pytest.mark.integration

QUEUE = "host-test"
Served = tuple[str, "Recorder", QueueClient]


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, int]] = []
        self.attempts: dict[str, int] = {}

    def add(self, body: str, dequeue_count: int) -> None:
        with self.lock:
            self.seen.append((body, dequeue_count))
            self.attempts[body] = self.attempts.get(body, 0) + 1


def make_app(recorder: Recorder, release: asyncio.Event | None = None) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="slow", methods=["GET"])
    async def slow_get(req: func.HttpRequest) -> func.HttpResponse:
        await asyncio.sleep(float(req.params.get("seconds", "2")))
        return func.HttpResponse("slow")

    @app.route(route="fast", methods=["GET"])
    async def fast_get(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("fast")

    @app.queue_trigger(arg_name="msg", queue_name="%HOST_TEST_QUEUE%", connection="HostTestStorage")
    def host_test_queue(msg: func.QueueMessage) -> None:
        body = msg.get_body().decode()
        recorder.add(body, msg.dequeue_count or 0)
        if body.startswith("fail"):
            raise RuntimeError("this message always fails")

    return app


@contextlib.contextmanager
def serving(stack: Stack, before_start: Callable[[QueueClient], None] | None = None) -> Iterator[Served]:
    recorder = Recorder()
    config = HostConfig(
        route_prefix="api",
        queues=QueueOptions(batch_size=4, max_polling_interval=0.5, visibility_timeout=0, max_dequeue_count=3),
    )
    host = FunctionHost(make_app(recorder), config)
    queue = QueueClient.from_connection_string(stack.storage_connection_string(), QUEUE)
    poison = QueueClient.from_connection_string(stack.storage_connection_string(), f"{QUEUE}-poison")
    if before_start:
        queue.create_queue()
        before_start(queue)
    try:
        with serve_in_thread(host, free_port()) as url:
            yield url, recorder, queue
    finally:
        queue.delete_queue()
        poison.delete_queue()


@pytest.fixture
def env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_TEST_QUEUE", QUEUE)
    monkeypatch.setenv("HostTestStorage", stack.storage_connection_string())


@pytest.fixture
def served(stack: Stack, env: None) -> Iterator[Served]:
    with serving(stack) as served:
        yield served


def wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_a_request_is_served_while_another_is_slow(served: Served) -> None:
    url, _, _ = served
    finished: list[str] = []

    def slow() -> None:
        finished.append(httpx.get(f"{url}/api/slow?seconds=3", timeout=30).text)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    assert httpx.get(f"{url}/api/fast", timeout=30).text == "fast"
    assert finished == []  # the slow one is still running: the fast one did not wait for it
    thread.join()
    assert finished == ["slow"]


def test_a_message_sent_with_the_sdk_runs_the_queue_function(served: Served) -> None:
    _, recorder, queue = served
    payload = json.dumps({"hello": "world"})
    queue.send_message(base64.b64encode(payload.encode()).decode())  # the host's default messageEncoding
    wait_for(lambda: recorder.seen)
    assert recorder.seen == [(payload, 1)]
    wait_for(lambda: queue.get_queue_properties().approximate_message_count == 0)


def test_a_failing_message_is_retried_then_moved_to_poison(
    served: Served, stack: Stack
) -> None:
    _, recorder, queue = served
    queue.send_message(base64.b64encode(b"fail-1").decode())
    queue.send_message(base64.b64encode(b"ok-1").decode())
    poison = QueueClient.from_connection_string(stack.storage_connection_string(), f"{QUEUE}-poison")
    wait_for(lambda: poison.peek_messages())
    assert recorder.attempts["fail-1"] == 3  # maxDequeueCount
    assert recorder.attempts["ok-1"] == 1  # other messages are not affected
    assert [base64.b64decode(m.content) for m in poison.peek_messages()] == [b"fail-1"]
    assert [count for body, count in recorder.seen if body == "fail-1"] == [1, 2, 3]


def test_a_message_not_base64_encoded_goes_to_poison_at_once_without_running(
    served: Served, stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # As the Functions host's queue extension does: retrying cannot change a message's encoding.
    _, recorder, queue = served
    plain = '{"batch_id": "plain-json"}'  # sent without the host's default messageEncoding
    poison = QueueClient.from_connection_string(stack.storage_connection_string(), f"{QUEUE}-poison")
    with caplog.at_level(logging.ERROR, logger="recsys"):
        queue.send_message(plain)
        queue.send_message(base64.b64encode(b"ok-2").decode())
        wait_for(lambda: [m.content for m in poison.peek_messages(max_messages=32)] == [plain])
        wait_for(lambda: ("ok-2", 1) in recorder.seen)
    assert [body for body, _ in recorder.seen if "plain-json" in body] == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("is not base64-encoded" in m for m in messages), messages
    assert any(m.endswith("-poison after 1 attempts") for m in messages), messages


def test_a_message_delivered_too_often_goes_to_poison_without_running(stack: Stack, env: None) -> None:
    def deliver_four_times(queue: QueueClient) -> None:
        queue.send_message(base64.b64encode(b"worn-out").decode())
        for _ in range(4):  # each receive counts as a delivery whose holder then vanished
            assert [m.content for m in queue.receive_messages(visibility_timeout=1)]
            time.sleep(1.1)

    with serving(stack, deliver_four_times) as (_, recorder, _queue):
        poison = QueueClient.from_connection_string(stack.storage_connection_string(), f"{QUEUE}-poison")
        wait_for(lambda: poison.peek_messages())
        assert recorder.seen == []


def test_the_functions_keep_the_settings_the_host_started_with() -> None:
    """As app settings in Azure: code sharing the process that points the environment at another
    queue (tests, benchmarks) does not redirect the functions of a host already running."""
    from recsys.config import get_settings, settings_environment

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="queue/async", methods=["GET"])
    async def queue_async(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(get_settings().queue_name)

    @app.route(route="queue/sync", methods=["GET"])
    def queue_sync(req: func.HttpRequest) -> func.HttpResponse:  # runs in a worker thread
        return func.HttpResponse(get_settings().queue_name)

    host = FunctionHost(app, HostConfig(route_prefix="api"))
    with settings_environment({"RECSYS_QUEUE_NAME": "started-with"}), serve_in_thread(host, free_port()) as url, \
            settings_environment({"RECSYS_QUEUE_NAME": "changed-later"}):
        assert get_settings().queue_name == "changed-later"
        for kind in ("async", "sync"):
            answer = httpx.get(f"{url}/api/queue/{kind}", timeout=10)
            assert (answer.status_code, answer.text) == (200, "started-with"), kind


# The shape of `python -m recsys run`: the host serves in the main thread, and the code that
# stopped the stack (here: writes a file) runs once serve() returns.
_SERVE_THEN_CLEAN_UP = """
import sys
from pathlib import Path
from recsys.local.cli import serve
try:
    code = serve("127.0.0.1", int(sys.argv[1]))
finally:
    Path(sys.argv[2]).write_text("stopped")
sys.exit(code)
"""


def test_sigterm_stops_the_host_and_lets_the_stack_stop_after_it(stack: Stack, tmp_path: Path) -> None:
    # uvicorn shuts down on SIGTERM, then raises it again; without a handler of ours that ended
    # the process there, before `python -m recsys run` stopped PostgreSQL, PgBouncer and Azurite.
    port, marker, log_path = free_port(), tmp_path / "cleaned-up", tmp_path / "host.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-c", _SERVE_THEN_CLEAN_UP, str(port), str(marker)],
                                   env={**os.environ, **stack.app_environment()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", log_path)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log_path.read_text()
    assert marker.read_text() == "stopped"
