"""``GET /api/health``: is the database reachable through the pool, and how is the pool doing."""

from __future__ import annotations

import asyncio

import azure.functions as func

from recsys.config import get_settings
from recsys.db.pool import get_pool, pool_stats
from recsys.errors import Busy
from recsys.http.responses import error_response, json_response
from recsys.telemetry import invocation_span

__all__ = ["bp"]

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@invocation_span
async def health_get(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    pool = await get_pool()
    try:
        # Bounded, so that a database that hangs answers 503 instead of holding the probe.
        async with asyncio.timeout(settings.pool_timeout + settings.connect_timeout):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
    except Exception as exc:  # any failure to reach the database is the answer itself
        stats = pool_stats()
        error = Busy(f"database unreachable: {type(exc).__name__}", retry_after=5)
        response = error_response(error)
        body = {**error.to_body(), "status": "unavailable", "database": "unreachable", "pool": stats}
        return json_response(body, status=503, headers=dict(response.headers))
    return json_response({"status": "ok", "database": "ok", "pool": pool_stats()})
