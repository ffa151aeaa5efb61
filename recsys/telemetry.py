"""OpenTelemetry traces and metrics, sent to Application Insights when it is configured.

Azure Functions Python apps export with the Azure Monitor OpenTelemetry distro: when
``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set, the first invocation of the worker calls
``configure_azure_monitor`` (never at import: a failing exporter must not hide the functions).
Without it the spans and metrics go to whatever providers the process has (none: no cost
beyond a no-op call; tests install in-memory ones).

Each invocation is a span (``SERVER`` for HTTP, ``CONSUMER`` for the queue); the query path's
statements and the Azure SDK's storage calls are its children. Attributes carry names, counts
and the route template, never a query string (``code=`` is a function key), a body, a
connection string or a token.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import Span

__all__ = [
    "configure_telemetry",
    "database_span",
    "invocation_span",
    "record_ef_search",
    "record_load",
]

log = logging.getLogger("recsys")

INSTRUMENTATION = "recsys"
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_lock = threading.Lock()
_configured = False
_instruments: dict[str, Any] = {}


def configure_telemetry(env: Mapping[str, str] | None = None) -> bool:
    """Set up the Azure Monitor exporter once per process if Application Insights is configured.

    Returns whether it is configured. A failure is logged once and leaves telemetry off.
    """
    global _configured
    env = os.environ if env is None else env
    with _lock:
        if _configured:
            return True
        if not env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
            return False
        _configured = True
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor

            # Exports the "recsys" logger's records too; the Azure SDK's storage calls become
            # spans (azure-core's OpenTelemetry tracing, which the distro turns on).
            configure_azure_monitor(logger_name="recsys")
        except Exception as exc:  # telemetry must never take the app down
            log.warning("application insights not configured: %s", exc)
            return False
    return True


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(INSTRUMENTATION)


def _instrument(name: str) -> Any:
    """The metric instrument ``name``, created on first use against the global meter provider."""
    instrument = _instruments.get(name)
    if instrument is None:
        with _lock:
            if name not in _instruments:
                _create_instruments()
        instrument = _instruments[name]
    return instrument


def _create_instruments() -> None:
    from opentelemetry import metrics

    meter = metrics.get_meter(INSTRUMENTATION)
    _instruments["loader.items"] = meter.create_counter(
        "recsys.loader.items", unit="{item}", description="items written by the loader")
    _instruments["loader.rate"] = meter.create_histogram(
        "recsys.loader.items_per_second", unit="{item}/s", description="items per second of each loaded message")
    _instruments["loader.stale"] = meter.create_counter(
        "recsys.loader.stale", unit="{write}", description="writes ignored because a newer version was stored")
    _instruments["loader.poisoned"] = meter.create_counter(
        "recsys.loader.poisoned", unit="{message}", description="messages moved to the poison queue")
    _instruments["search.ef_search"] = meter.create_histogram(
        "recsys.search.ef_search", unit="1", description="ef_search chosen for a recall_target")
    meter.create_observable_gauge("recsys.pool.size", [_pool_observer("pool_size")], unit="{connection}",
                                  description="connections open in the pool")
    meter.create_observable_gauge("recsys.pool.available", [_pool_observer("pool_available")],
                                  unit="{connection}", description="idle connections in the pool")
    meter.create_observable_gauge("recsys.pool.waiting", [_pool_observer("requests_waiting")], unit="{request}",
                                  description="requests waiting for a connection now")
    meter.create_observable_counter("recsys.pool.wait_time", [_pool_observer("requests_wait_ms")], unit="ms",
                                    description="total time requests waited for a connection")
    meter.create_observable_counter("recsys.pool.errors", [_pool_observer("requests_errors")], unit="{request}",
                                    description="requests that got no connection (timeout or error)")


def _pool_observer(key: str) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        from opentelemetry.metrics import Observation

        from recsys.db.pool import all_pool_stats

        for purpose, stats in all_pool_stats():
            yield Observation(stats.get(key, 0), {"recsys.pool.purpose": purpose})

    return observe


def _set_http_attributes(span: Span, req: Any) -> None:
    from urllib.parse import urlsplit

    span.set_attribute("faas.trigger", "http")
    span.set_attribute("http.request.method", str(getattr(req, "method", "") or ""))
    # The path only: the query string may hold the function key (code=).
    span.set_attribute("url.path", urlsplit(str(getattr(req, "url", "") or "")).path)


def invocation_span(handler: F) -> F:
    """Wrap a function handler (HTTP or queue) in a span named after it.

    The wrapper keeps the handler's signature (``functools.wraps``), which the Functions
    library reads to match the parameters with the bindings.
    """
    name = handler.__name__

    @functools.wraps(handler)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        configure_telemetry()
        _instrument("loader.items")  # the pool gauges exist from the first invocation on
        from opentelemetry.trace import SpanKind, Status, StatusCode

        argument = next(iter(kwargs.values()), None) if kwargs else (args[0] if args else None)
        is_http = argument is not None and hasattr(argument, "route_params")
        is_timer = argument is not None and hasattr(argument, "past_due")
        kind = SpanKind.SERVER if is_http else SpanKind.INTERNAL if is_timer else SpanKind.CONSUMER
        with _tracer().start_as_current_span(name, kind=kind, record_exception=True) as span:
            span.set_attribute("faas.name", name)
            if is_http:
                _set_http_attributes(span, argument)
            elif is_timer:
                span.set_attribute("faas.trigger", "timer")
                span.set_attribute("recsys.timer.past_due", bool(getattr(argument, "past_due", False)))
            else:
                span.set_attribute("faas.trigger", "pubsub")
                span.set_attribute("messaging.system", "azure_storage_queue")
                message_id = getattr(argument, "id", None)
                if message_id:
                    span.set_attribute("messaging.message.id", str(message_id))
                dequeue_count = getattr(argument, "dequeue_count", None)
                if dequeue_count is not None:
                    span.set_attribute("messaging.azure_queue.dequeue_count", int(dequeue_count))
            result = await handler(*args, **kwargs)
            status = getattr(result, "status_code", None)
            if status is not None:
                span.set_attribute("http.response.status_code", int(status))
                if int(status) >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            return result

    return traced  # type: ignore[return-value]


@contextmanager
def database_span(operation: str, query: str) -> Iterator[None]:
    """A ``CLIENT`` span for one statement (one round trip) of the query path.

    ``query`` is the statement's text with its placeholders: values travel as parameters and
    are never recorded.
    """
    from opentelemetry.trace import SpanKind

    attributes = {"db.system.name": "postgresql", "db.operation.name": operation, "db.query.text": query}
    with _tracer().start_as_current_span(f"db {operation}", kind=SpanKind.CLIENT, attributes=attributes):
        yield


def record_load(*, status: str, rows: int, stale: int, seconds: float) -> None:
    """Metrics of one message the loader handled: items written, rate, stale writes, poisoning."""
    if status == "failed":
        _instrument("loader.poisoned").add(1)
        return
    _instrument("loader.items").add(rows)
    _instrument("loader.stale").add(stale)
    if rows and seconds > 0:
        _instrument("loader.rate").record(rows / seconds)


def record_ef_search(ef_search: int, recall_target: float) -> None:
    """The ``ef_search`` the calibration chose for a request's ``recall_target``."""
    _instrument("search.ef_search").record(ef_search, {"recsys.recall_target": recall_target})

