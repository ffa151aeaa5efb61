"""A local host for the function app, standing in for Azure Functions Core Tools.

It discovers every function and binding from the app object (``app.get_functions()``) and
keeps no list of its own:

- HTTP triggers are served by an ASGI application (run under uvicorn) at
  ``/<routePrefix>/<route>``, with Azure's route template syntax, methods and auth levels;
  function keys are enforced when one is configured (``x-functions-key`` header or ``code``
  query parameter), as in Azure.
- Queue triggers are driven from Azure Storage (Azurite locally) as the Functions host does,
  honouring ``host.json`` ``extensions.queues``: ``batchSize`` and ``newBatchThreshold``
  (concurrency), ``maxPollingInterval``, ``visibilityTimeout`` (delay before a failed message
  is retried), ``maxDequeueCount`` (then ``<queue>-poison``) and ``messageEncoding``.
- Timer triggers fire on their NCRONTAB schedule (``recsys.ncrontab``, UTC) as the Functions host
  fires them: ``runOnStartup`` runs the function once when the host starts; with ``useMonitor``
  (by default when occurrences are at least a minute apart) the schedule's status (last and next
  occurrence) is kept in the storage account, as the host keeps it, so that an occurrence missed
  while the host was down runs at start with ``past_due`` set. Runs of one function never overlap.

Handlers may be ``async def`` (run on the event loop) or plain functions (run in threads).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import azure.functions as func
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

__all__ = [
    "FunctionHost",
    "HostConfig",
    "QueueOptions",
    "TimerDriver",
    "discover",
    "load_host_config",
    "load_local_settings",
    "serve_in_thread",
]

log = logging.getLogger("recsys")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ----------------------------------------------------------------------------- configuration


def _timespan(value: str | int | float | None, default: float) -> float:
    """Seconds of a host.json time span (``"00:00:05"``, ``"1.00:00:00"``) or a number."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    days = 0
    text = value
    if "." in text.split(":")[0]:
        day_text, text = text.split(".", 1)
        days = int(day_text)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    hours, minutes, seconds = parts
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class QueueOptions:
    """``extensions.queues`` of host.json, with the Functions host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int | None = None
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @property
    def threshold(self) -> int:
        return self.batch_size // 2 if self.new_batch_threshold is None else self.new_batch_threshold


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)


def load_host_config(source: Path | Mapping[str, Any]) -> HostConfig:
    """Read the parts of host.json this host honours."""
    data = json.loads(Path(source).read_text()) if isinstance(source, Path) else dict(source)
    extensions = data.get("extensions", {})
    prefix = extensions.get("http", {}).get("routePrefix", "api")
    q = extensions.get("queues", {})
    encoding = str(q.get("messageEncoding", "base64")).lower()
    if encoding not in ("base64", "none"):
        raise ValueError(f"host.json extensions.queues.messageEncoding must be base64 or none, got {encoding}")
    return HostConfig(
        route_prefix=prefix.strip("/"),
        queues=QueueOptions(
            batch_size=int(q.get("batchSize", 16)),
            new_batch_threshold=q.get("newBatchThreshold"),
            max_polling_interval=_timespan(q.get("maxPollingInterval"), 60.0),
            visibility_timeout=_timespan(q.get("visibilityTimeout"), 0.0),
            max_dequeue_count=int(q.get("maxDequeueCount", 5)),
            message_encoding=encoding,
        ),
    )


def load_local_settings(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    """Copy ``Values`` of local.settings.json into the environment, as Core Tools does.

    Variables already set in the environment win. Returns the names that were set.
    """
    target = os.environ if environ is None else environ
    if not path.exists():
        return []
    values = json.loads(path.read_text()).get("Values", {})
    applied = []
    for key, value in values.items():
        if key not in target and value not in (None, ""):
            target[key] = str(value)
            applied.append(key)
    return applied


def _resolve_setting(value: str) -> str:
    """``%NAME%`` binding expressions are app settings, as in Azure."""
    match = re.fullmatch(r"%([^%]+)%", value)
    if not match:
        return value
    name = match.group(1)
    if name not in os.environ:
        raise KeyError(f"binding refers to app setting {name}, which is not set")
    return os.environ[name]


# ----------------------------------------------------------------------------- HTTP routing

_SEGMENT = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(\??)(?::([A-Za-z]+)(?:\([^)]*\))?)?(?:=[^}]*)?\}")
_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "alpha": r"[A-Za-z]+",
    "bool": r"(?i:true|false)",
    "guid": r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
}


def _compile_route(template: str) -> tuple[re.Pattern[str], tuple[int, int]]:
    """A regular expression for an Azure route template, and its sort key (literals first)."""
    pattern = ""
    literal_segments = 0
    segments = [s for s in template.strip("/").split("/") if s]
    for index, segment in enumerate(segments):
        separator = "/" if index else ""
        last = 0
        piece = ""
        optional = False
        for match in _SEGMENT.finditer(segment):
            piece += re.escape(segment[last:match.start()])
            catch_all, name, opt, constraint = match.groups()
            body = ".*" if catch_all else _CONSTRAINTS.get((constraint or "").lower(), r"[^/]+")
            piece += f"(?P<{name}>{body})"
            optional = optional or bool(opt) or bool(catch_all)
            last = match.end()
        piece += re.escape(segment[last:])
        if last == 0:
            literal_segments += 1
        pattern += f"(?:{separator}{piece})?" if optional else separator + piece
    return re.compile(f"^{pattern}/?$"), (-literal_segments, -len(segments))


@dataclass(frozen=True)
class HttpFunction:
    name: str
    handler: Callable[..., Any]
    arg_name: str
    methods: frozenset[str] | None
    auth_level: str
    route: str
    pattern: re.Pattern[str]
    order: tuple[int, int]


@dataclass(frozen=True)
class QueueFunction:
    name: str
    handler: Callable[..., Any]
    arg_name: str
    queue_name: str
    connection: str


@dataclass(frozen=True)
class TimerFunction:
    name: str
    handler: Callable[..., Any]
    arg_name: str
    schedule: str
    run_on_startup: bool
    use_monitor: bool | None


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


#: ``get_functions()`` may be called only once per app object (a second call raises a
#: duplicate-name error), so what it found is kept per app.
_discovered: weakref.WeakKeyDictionary[
    func.FunctionApp, tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]
] = weakref.WeakKeyDictionary()


def discover(app: func.FunctionApp) -> tuple[list[HttpFunction], list[QueueFunction]]:
    """HTTP and queue functions of ``app`` with their bindings."""
    http, queues, _ = discover_all(app)
    return http, queues


def discover_all(app: func.FunctionApp) -> tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]:
    """HTTP, queue and timer functions of ``app`` with their bindings."""
    if app not in _discovered:
        _discovered[app] = _discover(app)
    return _discovered[app]


def _discover(app: func.FunctionApp) -> tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]:
    http: list[HttpFunction] = []
    queues: list[QueueFunction] = []
    timers: list[TimerFunction] = []
    for function in app.get_functions():
        trigger = function.get_trigger()
        if trigger is None:
            continue
        data: dict[str, Any] = trigger.get_dict_repr()
        name = str(function.get_function_name())
        handler = function.get_user_function()
        kind = data.get("type")
        if kind == "httpTrigger":
            route = str(data.get("route") or name)
            methods = data.get("methods")
            pattern, order = _compile_route(route)
            http.append(HttpFunction(
                name=name,
                handler=handler,
                arg_name=data["name"],
                methods=frozenset(_value(m).upper() for m in methods) if methods else None,
                auth_level=_value(data.get("authLevel", "function")).lower(),
                route=route,
                pattern=pattern,
                order=order,
            ))
        elif kind == "queueTrigger":
            queues.append(QueueFunction(
                name=name,
                handler=handler,
                arg_name=data["name"],
                queue_name=data["queueName"],
                connection=data.get("connection") or "AzureWebJobsStorage",
            ))
        elif kind == "timerTrigger":
            timers.append(TimerFunction(
                name=name,
                handler=handler,
                arg_name=data["name"],
                schedule=str(data["schedule"]),
                run_on_startup=bool(data.get("runOnStartup")),
                use_monitor=data.get("useMonitor"),
            ))
        else:
            log.warning("function %s has a %s trigger, which the local host does not run", name, kind)
    http.sort(key=lambda f: f.order)
    return http, queues, timers


async def _call(handler: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if asyncio.iscoroutinefunction(handler):
        return await handler(**kwargs)
    return await asyncio.to_thread(handler, **kwargs)


# ----------------------------------------------------------------------------- the host


class FunctionHost:
    """ASGI application serving the HTTP functions, and the queue drivers as its lifespan."""

    def __init__(
        self,
        app: func.FunctionApp,
        config: HostConfig | None = None,
        *,
        function_key: str | None = None,
        run_queues: bool = True,
        run_timers: bool | None = None,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config or HostConfig()
        self.http_functions, self.queue_functions, self.timer_functions = discover_all(app)
        self.function_key = function_key
        self.run_queues = run_queues
        self.run_timers = run_queues if run_timers is None else run_timers
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._drivers: list[QueueDriver | TimerDriver] = []
        self._tasks: list[asyncio.Task[None]] = []

    # ---- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("local host failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        if self._on_startup:
            await self._on_startup()
        if self.run_queues:
            for function in self.queue_functions:
                driver = QueueDriver(function, self.config.queues)
                await driver.prepare()
                self._drivers.append(driver)
                self._tasks.append(asyncio.create_task(driver.run(), name=f"queue:{function.name}"))
        if self.run_timers:
            for timer in self.timer_functions:
                timer_driver = TimerDriver(timer)
                self._drivers.append(timer_driver)
                self._tasks.append(asyncio.create_task(timer_driver.run(), name=f"timer:{timer.name}"))

    async def stop(self) -> None:
        for driver in self._drivers:
            driver.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for driver in self._drivers:
            await driver.close()
        self._drivers.clear()
        self._tasks.clear()
        if self._on_shutdown:
            await self._on_shutdown()

    def match(self, method: str, path: str) -> tuple[HttpFunction | None, dict[str, str], frozenset[str] | None]:
        """The function for ``method`` and ``path``, its route parameters, and the methods of the path.

        The methods are ``None`` when no function serves the path at all (404), and the methods
        some function accepts there otherwise (405 when ``method`` is not one of them).
        """
        prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return None, {}, None
        relative = path[len(prefix):].lstrip("/")
        allowed: set[str] | None = None
        for function in self.http_functions:
            found = function.pattern.match(relative)
            if not found:
                continue
            if function.methods is None or method in function.methods:
                params = {k: v for k, v in found.groupdict().items() if v is not None}
                return function, params, function.methods or frozenset(_ALL_METHODS)
            allowed = (allowed or set()) | function.methods
        return None, {}, None if allowed is None else frozenset(allowed)

    def _authorised(self, function: HttpFunction, headers: Mapping[str, str], params: Mapping[str, str]) -> bool:
        if function.auth_level == "anonymous" or not self.function_key:
            return True
        given = headers.get("x-functions-key") or params.get("code") or ""
        return hmac.compare_digest(given.encode(), self.function_key.encode())

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"].upper()
        try:
            path, params = _decode_target(scope)
        except _BadTarget as exc:
            await _send_json(send, 400, {"error": exc.message, "code": "invalid_argument", "field": exc.field})
            return
        function, route_params, methods = self.match(method, path)
        if function is None:
            if methods is None:
                await _send_json(send, 404, {"error": "no function at this route", "code": "not_found"})
            else:
                # Azure's own host answers an empty 404 here; RFC 9110 asks for 405 and Allow.
                allow = ", ".join(sorted(methods))
                error = {"error": f"method {method} not allowed; allowed: {allow}", "code": "method_not_allowed"}
                await _send_json(send, 405, error, headers={"Allow": allow})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers: dict[str, str] = {}
        for raw_key, raw_value in scope["headers"]:
            key = raw_key.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if not self._authorised(function, headers, params):
            await _send_json(send, 401, {"error": "a valid function key is required", "code": "unauthorized"})
            return
        query = scope.get("query_string", b"").decode("latin-1")
        host = headers.get("host", "localhost")
        url = f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{quote(path)}"
        if query:
            url += f"?{query}"
        request = func.HttpRequest(
            method, url, headers=headers, params=params, route_params=route_params, body=bytes(body)
        )
        try:
            response = await _call(function.handler, {function.arg_name: request})
        except Exception:
            # As the Functions host does: log the failure, answer 500 without details.
            log.exception("function %s failed", function.name)
            await _send_json(send, 500, {"error": "internal error", "code": "internal"})
            return
        await _send_response(send, response)


#: What a function that names no methods accepts (the Functions host's default).
_ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")


class _BadTarget(Exception):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _decode_target(scope: Scope) -> tuple[str, dict[str, str]]:
    """The request's path and query parameters, percent-decoded as strict UTF-8.

    uvicorn decodes the path leniently (an invalid sequence becomes U+FFFD), which would
    silently turn one id into another; a client that sends bytes that are not UTF-8 gets a
    400 naming the path or the parameter instead.
    """
    raw_path = scope.get("raw_path")
    if raw_path is None:
        path = str(scope["path"])
    else:
        try:
            path = unquote_to_bytes(bytes(raw_path).split(b"?", 1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadTarget("the path is not valid UTF-8 once percent-decoded", "path") from None
    params: dict[str, str] = {}
    for pair in bytes(scope.get("query_string", b"")).split(b"&"):
        if not pair:
            continue
        raw_key, _, raw_value = pair.replace(b"+", b" ").partition(b"=")
        try:
            key = unquote_to_bytes(raw_key).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadTarget("a query parameter name is not valid UTF-8", "query") from None
        try:
            params[key] = unquote_to_bytes(raw_value).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadTarget(f"query parameter {key} is not valid UTF-8", key) from None
    return path, params


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    response = func.HttpResponse(json.dumps(body), status_code=status, headers=headers, mimetype="application/json")
    await _send_response(send, response)


async def _send_response(send: Send, response: func.HttpResponse | str | None) -> None:
    if not isinstance(response, func.HttpResponse):
        response = func.HttpResponse("" if response is None else str(response), status_code=200)
    body = response.get_body() or b""
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in response.headers.items()]
    names = {k for k, _ in headers}
    if b"content-type" not in names:
        mimetype = response.mimetype or "text/plain"
        charset = response.charset or "utf-8"
        headers.append((b"content-type", f"{mimetype}; charset={charset}".encode("latin-1")))
    headers = [(k, v) for k, v in headers if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- queue driver


class QueueDriver:
    """Drives one queue-triggered function as the Functions host's queue listener does."""

    #: How long a message stays invisible while its function runs (the host renews its lease;
    #: this driver makes it long enough instead).
    LEASE_SECONDS = 300
    MIN_POLL = 0.1

    def __init__(self, function: QueueFunction, options: QueueOptions) -> None:
        from recsys.config import storage_account
        from recsys.ingest.clients import queue_client

        self.function = function
        self.options = options
        # A connection string, or <connection>__accountName / __queueServiceUri with a managed
        # identity, as the Functions host reads the trigger's connection.
        account = storage_account(os.environ, function.connection, default=None)
        self.queue_name = _resolve_setting(function.queue_name)
        self.queue = queue_client(account, self.queue_name)
        self.poison = queue_client(account, f"{self.queue_name}-poison")
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    async def prepare(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        for client in (self.queue, self.poison):
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        await self.queue.close()
        await self.poison.close()

    async def run(self) -> None:
        delay = self.MIN_POLL
        options = self.options
        while not self._stopping.is_set():
            fetched = 0
            if len(self._running) <= options.threshold:
                try:
                    messages = self.queue.receive_messages(
                        messages_per_page=options.batch_size,
                        max_messages=options.batch_size,
                        visibility_timeout=self.LEASE_SECONDS,
                    )
                    async for message in messages:
                        fetched += 1
                        task = asyncio.create_task(self._process(message))
                        self._running.add(task)
                        task.add_done_callback(self._running.discard)
                except Exception as exc:  # storage unreachable: keep polling, as the host does
                    log.warning("queue %s: receive failed: %s", self.queue_name, exc)
            # Poll again at once after a full batch; back off exponentially while the queue is empty.
            delay = self.MIN_POLL if fetched else min(delay * 2, options.max_polling_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=0 if fetched == options.batch_size else delay)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _decode(self, content: str | bytes) -> bytes:
        raw = content.encode() if isinstance(content, str) else content
        if self.options.message_encoding == "base64":
            return base64.b64decode(raw, validate=True)
        return raw

    async def _process(self, message: Any) -> None:
        function = self.function
        if (message.dequeue_count or 0) > self.options.max_dequeue_count:
            # Delivered more often than allowed (its previous holder died mid-run): poison it
            # without running it again, as the Functions host does.
            await self._to_poison(message)
            return
        try:
            body = self._decode(message.content)
        except ValueError as exc:  # binascii.Error included
            # The Functions host's queue extension moves a message it cannot decode to the poison
            # queue at once, without running the function: retrying cannot change its encoding.
            log.error("message %s of queue %s is not %s-encoded (host.json messageEncoding): %s",
                      message.id, self.queue_name, self.options.message_encoding, exc)
            await self._to_poison(message)
            return
        try:
            queue_message = QueueMessage(
                id=message.id,
                body=body,
                dequeue_count=message.dequeue_count,
                expiration_time=message.expires_on,
                insertion_time=message.inserted_on,
                time_next_visible=message.next_visible_on,
                pop_receipt=message.pop_receipt,
            )
            await _call(function.handler, {function.arg_name: queue_message})
        except Exception as exc:  # the function failed: retry later, then poison
            await self._failed(message, exc)
            return
        await self.queue.delete_message(message.id, message.pop_receipt)

    async def _failed(self, message: Any, exc: BaseException) -> None:
        count = message.dequeue_count or 1
        log.warning("function %s failed on message %s (attempt %d): %s", self.function.name, message.id, count, exc)
        if count >= self.options.max_dequeue_count:
            await self._to_poison(message)
        else:
            await self.queue.update_message(
                message.id, message.pop_receipt, visibility_timeout=int(self.options.visibility_timeout)
            )

    async def _to_poison(self, message: Any) -> None:
        log.error("message %s moved to %s-poison after %d attempts", message.id, self.queue_name, message.dequeue_count)
        await self.poison.send_message(message.content)
        await self.queue.delete_message(message.id, message.pop_receipt)


# ----------------------------------------------------------------------------- timer driver


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


class TimerDriver:
    """Fires one timer-triggered function on its schedule, as the Functions host's timer listener does.

    With ``useMonitor`` the schedule status is a blob of the ``AzureWebJobsStorage`` account
    (``azure-webjobs-hosts/timers/<host id>/<function>/status``, JSON with ``Last``, ``Next``
    and ``LastUpdated``, the host's own layout), so a restart knows what it missed.
    """

    HOST_ID = "recsys-local"
    STORAGE_SETTING = "AzureWebJobsStorage"
    CONTAINER = "azure-webjobs-hosts"
    #: Late by more than this counts as past due (the host's own timer wakes up a little late).
    PAST_DUE_AFTER = timedelta(seconds=1)

    def __init__(self, function: TimerFunction, *, clock: Callable[[], datetime] | None = None) -> None:
        from recsys.ncrontab import parse_schedule

        self.function = function
        self.expression = _resolve_setting(function.schedule)
        self.schedule = parse_schedule(self.expression)
        self._now = clock or (lambda: datetime.now(UTC))
        self._stopping = asyncio.Event()
        self.runs = 0
        self.use_monitor = self._default_use_monitor() if function.use_monitor is None else bool(function.use_monitor)

    def _default_use_monitor(self) -> bool:
        # The host monitors schedules whose occurrences are at least a minute apart.
        first = self.schedule.next_after(datetime(2001, 1, 1, tzinfo=UTC))
        return (self.schedule.next_after(first) - first) >= timedelta(minutes=1)

    @property
    def status_blob(self) -> str:
        return f"timers/{self.HOST_ID}/{self.function.name}/status"

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        return None

    def _blob_service(self) -> Any:
        """The host's storage account (``AzureWebJobsStorage``: connection string or identity)."""
        from recsys.config import SettingsError, storage_account
        from recsys.ingest.clients import blob_service

        try:
            return blob_service(storage_account(os.environ, self.STORAGE_SETTING, default=None))
        except SettingsError:
            return None

    async def _read_status(self) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        service = self._blob_service()
        if service is None:
            return None
        try:
            async with service:
                blob = service.get_blob_client(self.CONTAINER, self.status_blob)
                data = await (await blob.download_blob()).readall()
            status = json.loads(data)
            return status if isinstance(status, dict) else None
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # storage unreachable: run on schedule without the monitor's memory
            log.warning("timer %s: cannot read its schedule status: %s", self.function.name, exc)
            return None

    async def _write_status(self, status: dict[str, Any]) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        service = self._blob_service()
        if service is None:
            return
        data = json.dumps(status).encode()
        try:
            async with service:
                blob = service.get_blob_client(self.CONTAINER, self.status_blob)
                try:
                    await blob.upload_blob(data, overwrite=True)
                except ResourceNotFoundError:
                    with contextlib.suppress(ResourceExistsError):
                        await service.create_container(self.CONTAINER)
                    await blob.upload_blob(data, overwrite=True)
        except Exception as exc:
            log.warning("timer %s: cannot record its schedule status: %s", self.function.name, exc)

    async def _wait_until(self, when: datetime) -> bool:
        """Sleep until ``when``; False when the host stops first."""
        while not self._stopping.is_set():
            remaining = (when - self._now()).total_seconds()
            if remaining <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=min(remaining, 60.0))
        return False

    async def _fire(self, *, past_due: bool, status: dict[str, Any]) -> None:
        request = TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})
        self.runs += 1
        try:
            await _call(self.function.handler, {self.function.arg_name: request})
        except Exception:
            # As the host does: the failure is logged and the schedule goes on.
            log.exception("timer function %s failed", self.function.name)

    async def run(self) -> None:
        now = self._now()
        status = await self._read_status() if self.use_monitor else None
        last = _parse_iso(status.get("Last")) if status else None
        missed = _parse_iso(status.get("Next")) if status else None
        if missed is not None and missed <= now:
            log.info("timer %s: the occurrence of %s was missed; running now", self.function.name, _iso(missed))
            await self._fire(past_due=True, status=status or {})
            last = now
        elif self.function.run_on_startup:
            await self._fire(past_due=False, status=status or {})
        next_run = self.schedule.next_after(now)
        if self.use_monitor:
            await self._record(last, next_run)
        while not self._stopping.is_set():
            if not await self._wait_until(next_run):
                return
            fired_at = self._now()
            current = {"Last": _iso(last) if last else None, "Next": _iso(next_run), "LastUpdated": _iso(fired_at)}
            await self._fire(past_due=fired_at - next_run > self.PAST_DUE_AFTER, status=current)
            last = next_run
            next_run = self.schedule.next_after(max(next_run, self._now() - self.PAST_DUE_AFTER))
            if self.use_monitor:
                await self._record(last, next_run)

    async def _record(self, last: datetime | None, next_run: datetime) -> None:
        await self._write_status(
            {"Last": _iso(last) if last else None, "Next": _iso(next_run), "LastUpdated": _iso(self._now())}
        )


# ----------------------------------------------------------------------------- in a thread


@contextlib.contextmanager
def serve_in_thread(asgi_app: Any, port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``asgi_app`` with uvicorn in a background thread; yields the base URL.

    For tests and benchmarks, which need the host and their own code in one process.
    """
    import uvicorn

    from recsys.config import SettingsError, get_settings, pin_settings

    config = uvicorn.Config(asgi_app, host=host, port=port, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    try:
        settings = get_settings()
    except SettingsError:
        settings = None  # the functions that read them fail with the same error

    def run() -> None:
        # The functions keep the settings the host started with, whatever the rest of the
        # process does to the environment afterwards (as app settings in Azure).
        if settings is not None:
            pin_settings(settings)
        server.run()

    thread = threading.Thread(target=run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the local host did not start on port {port}")
        thread.join(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
