"""The local host's routing, keys and host.json handling, exercised over ASGI without a network."""

from __future__ import annotations

import json
from pathlib import Path

import azure.functions as func
import httpx
import pytest

from recsys.local.host import FunctionHost, HostConfig, QueueOptions, load_host_config, load_local_settings


def make_app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.route(route="things/{id}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    async def things_get(req: func.HttpRequest) -> func.HttpResponse:
        body = {"id": req.route_params["id"], "q": req.params.get("q"), "h": req.headers.get("x-test")}
        return func.HttpResponse(json.dumps(body), mimetype="application/json")

    @app.route(route="things/lookup", methods=["POST"])
    async def things_lookup(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(req.get_body(), status_code=201, headers={"X-Echo": "yes"})

    @app.route(route="numbers/{n:int}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def numbers_get(req: func.HttpRequest) -> func.HttpResponse:  # a plain function runs in a thread
        return func.HttpResponse(str(int(req.route_params["n"]) * 2))

    @app.route(route="broken", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    async def broken_get(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret detail")

    return app


@pytest.fixture
def host() -> FunctionHost:
    return FunctionHost(make_app(), HostConfig(route_prefix="api"), function_key="k3y", run_queues=False)


async def request(host: FunctionHost, method: str, url: str, **kwargs: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, url, **kwargs)  # type: ignore[arg-type]


async def test_route_parameters_query_and_headers_reach_the_handler(host: FunctionHost) -> None:
    response = await request(host, "GET", "/api/things/abc?q=1", headers={"X-Test": "t"})
    assert response.status_code == 200
    assert response.json() == {"id": "abc", "q": "1", "h": "t"}
    assert response.headers["content-type"].startswith("application/json")


async def test_literal_route_wins_over_parameter_and_method_matters(host: FunctionHost) -> None:
    response = await request(host, "POST", "/api/things/lookup", content=b"hello", headers={"x-functions-key": "k3y"})
    assert (response.status_code, response.content, response.headers["x-echo"]) == (201, b"hello", "yes")
    # GET on the same path is the parameterised route.
    assert (await request(host, "GET", "/api/things/lookup")).json()["id"] == "lookup"


async def test_function_key_is_enforced_by_header_or_code(host: FunctionHost) -> None:
    assert (await request(host, "POST", "/api/things/lookup")).status_code == 401
    assert (await request(host, "POST", "/api/things/lookup", headers={"x-functions-key": "nope"})).status_code == 401
    assert (await request(host, "POST", "/api/things/lookup?code=k3y")).status_code == 201


async def test_keys_are_not_required_when_none_is_configured() -> None:
    host = FunctionHost(make_app(), HostConfig(), run_queues=False)
    assert (await request(host, "POST", "/api/things/lookup")).status_code == 201


async def test_constraints_unknown_routes_and_methods(host: FunctionHost) -> None:
    assert (await request(host, "GET", "/api/numbers/21")).text == "42"
    assert (await request(host, "GET", "/api/numbers/x")).status_code == 404
    assert (await request(host, "GET", "/api/nothing")).status_code == 404
    assert (await request(host, "GET", "/things/abc")).status_code == 404  # outside the route prefix
    response = await request(host, "DELETE", "/api/things/abc")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json() == {"error": "method DELETE not allowed; allowed: GET", "code": "method_not_allowed"}
    # A path two functions serve (a literal and a parameterised route) allows both methods.
    response = await request(host, "PUT", "/api/things/lookup")
    assert (response.status_code, response.headers["allow"]) == (405, "GET, POST")
    assert (await request(host, "HEAD", "/api/numbers/21")).headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/api/things/%ED%A0%80", "path"),  # a UTF-8-encoded surrogate
        ("/api/things/%FF", "path"),
        ("/api/things/abc?q=%C3", "q"),  # a truncated sequence
        ("/api/things/abc?%FF=1", "query"),
    ],
)
async def test_paths_and_query_strings_that_are_not_utf8_are_a_400(host: FunctionHost, target: str, field: str) -> None:
    response = await request(host, "GET", target)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument" and response.json()["field"] == field


async def test_percent_encoded_utf8_reaches_the_handler_decoded(host: FunctionHost) -> None:
    response = await request(host, "GET", "/api/things/%C3%A9t%C3%A9%20%F0%9F%93%9A?q=a%2Bb+c%00")
    assert response.json()["id"] == "été 📚"
    assert response.json()["q"] == "a+b c\x00"


async def test_unhandled_exception_is_a_500_without_details(host: FunctionHost) -> None:
    response = await request(host, "GET", "/api/broken")
    assert response.status_code == 500
    assert "secret" not in response.text
    assert response.json()["code"] == "internal"


def test_host_json_of_the_project_is_honoured() -> None:
    config = load_host_config(Path(__file__).resolve().parents[2] / "host.json")
    assert config.route_prefix == "api"
    assert config.queues.message_encoding == "base64"
    assert config.queues.max_dequeue_count >= 1


def test_host_json_time_spans_and_defaults() -> None:
    config = load_host_config({"extensions": {"queues": {"visibilityTimeout": "00:01:30", "batchSize": 4}}})
    assert config.queues.visibility_timeout == 90
    assert config.queues.batch_size == 4 and config.queues.threshold == 2
    assert load_host_config({}) == HostConfig(route_prefix="api", queues=QueueOptions())
    with pytest.raises(ValueError, match="messageEncoding"):
        load_host_config({"extensions": {"queues": {"messageEncoding": "utf16"}}})


def test_local_settings_fill_the_environment_without_overriding(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {"A": "from-file", "B": "from-file", "C": ""}}))
    env = {"A": "from-env"}
    assert load_local_settings(path, env) == ["B"]
    assert env == {"A": "from-env", "B": "from-file"}
    assert load_local_settings(tmp_path / "missing.json", env) == []


def test_function_app_functions_are_discovered_once_per_app() -> None:
    app = make_app()
    first = FunctionHost(app, run_queues=False)
    second = FunctionHost(app, run_queues=False)  # get_functions() would refuse a second call
    assert [f.name for f in first.http_functions] == [f.name for f in second.http_functions]
