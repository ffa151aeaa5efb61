"""JSON bodies in and out, and the mapping of domain and database errors to responses.

This package is the only one that imports ``azure.functions``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from recsys.errors import Busy, RecsysError, StatementTimeout, TooLarge, UnsupportedMediaType
from recsys.http.bodies import parse_json_body

__all__ = ["MAX_BODY_BYTES", "error_response", "handle_errors", "json_response", "query_pairs", "read_json"]

log = logging.getLogger("recsys")

#: Largest request body accepted by the query endpoints; ingest endpoints pass their own.
MAX_BODY_BYTES = 1 << 20

Handler = Callable[[func.HttpRequest], Awaitable[func.HttpResponse]]


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=_default, separators=(",", ":"), allow_nan=False),
        status_code=status,
        headers=headers,
        mimetype="application/json",
        charset="utf-8",
    )


def error_response(error: RecsysError) -> func.HttpResponse:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Busy) else None
    return json_response(error.to_body(), status=error.status, headers=headers)


def query_pairs(req: func.HttpRequest) -> list[tuple[str, str]]:
    """The query string as (name, value) pairs, repeated names kept (``req.params`` keeps one).

    Read from ``req.url``, which carries the query string both in Azure and in the local host.
    """
    query = urlsplit(req.url).query
    if not query:
        return list(req.params.items())
    return parse_qsl(query, keep_blank_values=True)


def read_json(req: func.HttpRequest, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body parsed as JSON (``recsys.http.bodies`` says what is accepted).

    Raises :class:`UnsupportedMediaType` for a non-JSON content type, :class:`TooLarge`
    above ``max_bytes`` and :class:`InvalidArgument` for a body that is not acceptable JSON.
    """
    content_type = (req.headers.get("content-type") or "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type must be application/json, got {content_type}")
    body = req.get_body()
    if len(body) > max_bytes:
        raise TooLarge(f"request body is {len(body)} bytes, the limit is {max_bytes}")
    return parse_json_body(body)


def _as_domain_error(exc: BaseException, retry_after: int) -> RecsysError | None:
    if isinstance(exc, RecsysError):
        return exc
    if isinstance(exc, PoolTimeout):
        return Busy(retry_after=retry_after)
    if isinstance(exc, pg_errors.QueryCanceled):
        return StatementTimeout("the query exceeded the statement timeout")
    if isinstance(exc, psycopg.OperationalError):
        # The database, or PgBouncer in front of it, cannot be reached right now.
        return Busy(retry_after=retry_after)
    return None


def handle_errors(handler: Handler) -> Handler:
    """Answer domain errors, an exhausted pool and an unreachable database as ``API.md`` says.

    Anything else propagates: the Functions host logs it and answers 500.
    """

    @functools.wraps(handler)
    async def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        try:
            return await handler(req)
        except Exception as exc:
            error = _as_domain_error(exc, retry_after=1)
            if error is None:
                raise
            if error.status >= 500:
                log.warning("%s %s answered %s: %s", req.method, req.url, error.status, exc)
            return error_response(error)

    return wrapper
