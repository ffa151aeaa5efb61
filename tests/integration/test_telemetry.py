"""OpenTelemetry: one span per invocation, its statements and storage calls as children, metrics.

In-memory OpenTelemetry providers stand in for Application Insights' exporter (what
``configure_azure_monitor`` installs in Azure): the spans and metrics are the app's own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from ingest_support import IngestEnv, deliver_all, ingest_env, loader_handler, raw_items
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pgvector.psycopg import register_vector
from query_http import call

from recsys.local.stack import Stack
from recsys.telemetry import configure_telemetry

pytestmark = pytest.mark.integration
__all__ = ["ingest_env"]

FUNCTION_KEY = "fk-" + uuid.uuid4().hex


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.metrics.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            found.append((dict(point.attributes or {}), value if value is not None else point))
        return found


@pytest.fixture(scope="module")
def telemetry() -> Telemetry:
    """Process-wide providers (OpenTelemetry allows setting them once), and azure-core tracing."""
    from azure.core.settings import settings

    state = Telemetry()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(state.spans))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[state.metrics]))
    settings.tracing_implementation = "opentelemetry"
    return state


@pytest.fixture
def spans(telemetry: Telemetry) -> Iterator[Telemetry]:
    telemetry.spans.clear()
    yield telemetry


def all_attribute_text(spans: list[ReadableSpan]) -> str:
    return json.dumps([{**dict(s.attributes or {}), "name": s.name} for s in spans], default=str)


async def test_one_similar_request_is_a_span_with_its_statement_as_child(
    spans: Telemetry, stack: Stack, stack_env: dict[str, str], app_pools: None
) -> None:
    prefix = f"otel-{uuid.uuid4().hex[:6]}-"
    rng = np.random.default_rng(5)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items (id, embedding, category) VALUES (%s, %s, 'otel')",
                [(f"{prefix}{i}", rng.standard_normal(stack.config.embedding_dim).astype(np.float32))
                 for i in range(20)],
            )
    assert configure_telemetry({}) is False  # no Application Insights here: nothing set up

    answer = await call("similar_get", route_params={"id": f"{prefix}0"},
                        params={"k": "5", "category": "otel", "code": FUNCTION_KEY},
                        headers={"x-functions-key": FUNCTION_KEY})
    assert answer.status == 200 and len(answer.body["results"]) == 5

    finished = spans.finished()
    (invocation,) = [s for s in finished if s.name == "similar_get"]
    assert invocation.kind == SpanKind.SERVER and invocation.parent is None
    attributes = dict(invocation.attributes or {})
    assert attributes["faas.trigger"] == "http" and attributes["faas.name"] == "similar_get"
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == f"/api/items/{prefix}0/similar"
    assert attributes["http.response.status_code"] == 200

    statements = [s for s in finished if s.parent is not None and s.parent.span_id == invocation.context.span_id]
    assert [s.name for s in statements] == ["db recsys_query"]  # one round trip
    (statement,) = statements
    assert statement.kind == SpanKind.CLIENT and statement.context.trace_id == invocation.context.trace_id
    statement_attributes = dict(statement.attributes or {})
    assert statement_attributes["db.system.name"] == "postgresql"
    assert "recsys_query(" in statement_attributes["db.query.text"]
    assert prefix not in statement_attributes["db.query.text"]  # values travel as parameters

    text = all_attribute_text(finished)
    for secret in (FUNCTION_KEY, "recsys-local", "AccountKey", "Eby8vdM02x", "password"):
        assert secret not in text

    sizes = spans.metric_points("recsys.pool.size")
    assert any(a == {"recsys.pool.purpose": "query"} and v >= 1 for a, v in sizes)
    assert {a["recsys.pool.purpose"] for a, _ in spans.metric_points("recsys.pool.waiting")} >= {"query"}
    assert spans.metric_points("recsys.pool.wait_time") and spans.metric_points("recsys.pool.errors")


async def test_the_loader_counts_items_and_poisoned_messages_and_storage_calls_are_spans(
    spans: Telemetry, ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    before = sum(v for _, v in spans.metric_points("recsys.loader.items"))
    poisoned_before = sum(v for _, v in spans.metric_points("recsys.loader.poisoned"))

    answer = await call("batches_post", method="POST",
                        json_body={"batch_id": f"{env.prefix}b", "items": raw_items(3, env.prefix)})
    assert answer.status == 202
    env.send_raw("this is not {json")
    assert await deliver_all(env, loader_handler()) == 2

    assert sum(v for _, v in spans.metric_points("recsys.loader.items")) - before == 3
    assert sum(v for _, v in spans.metric_points("recsys.loader.poisoned")) - poisoned_before == 1
    assert spans.metric_points("recsys.loader.items_per_second")

    finished = spans.finished()
    (producer,) = [s for s in finished if s.name == "batches_post"]
    children = [s for s in finished if s.parent is not None and s.parent.span_id == producer.context.span_id]
    assert any("send_message" in s.name for s in children), [s.name for s in children]
    assert [s for s in finished if s.name == "loader_queue" and s.kind == SpanKind.CONSUMER]
    assert "AccountKey" not in all_attribute_text(finished) and "Eby8vdM02x" not in all_attribute_text(finished)


async def test_the_ef_search_chosen_for_a_recall_target_is_a_metric(
    spans: Telemetry, stack: Stack, stack_env: dict[str, str], app_pools: None
) -> None:
    from recsys.search.calibration import forget_calibrations

    prefix = f"otel-ef-{uuid.uuid4().hex[:6]}-"
    rng = np.random.default_rng(6)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        conn.execute("DELETE FROM recall_calibrations")
        row = conn.execute(
            "INSERT INTO recall_calibrations (k, sample_size, catalogue_size) VALUES (10, 20000, 20000) RETURNING id"
        ).fetchone()
        assert row is not None
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO recall_calibration_points (calibration_id, ef_search, recall) VALUES (%s, %s, %s)",
                [(row[0], ef, recall) for ef, recall in [(10, 0.80), (20, 0.90), (40, 0.96), (80, 0.99)]],
            )
            cur.executemany(
                "INSERT INTO items (id, embedding, category) VALUES (%s, %s, 'otel-ef')",
                [(f"{prefix}{i}", rng.standard_normal(stack.config.embedding_dim).astype(np.float32))
                 for i in range(12)],
            )
    forget_calibrations()
    try:
        answer = await call("similar_get", route_params={"id": f"{prefix}0"},
                            params={"k": "5", "recall_target": "0.95"})
        assert answer.status == 200 and answer.body["ef_search"] == 40
        points = [p for a, p in spans.metric_points("recsys.search.ef_search") if a == {"recsys.recall_target": 0.95}]
        assert len(points) == 1 and (points[0].count, points[0].sum) == (1, 40)
    finally:
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            conn.execute("DELETE FROM recall_calibrations")
        forget_calibrations()
