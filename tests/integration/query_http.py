"""Calling the app's HTTP handlers directly, and checking their answers against openapi.json."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import azure.functions as func
import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import function_app
from recsys.http.openapi import OPENAPI_PATH
from recsys.local.host import discover

__all__ = ["Answer", "call", "openapi", "routes"]

_DOC: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
_URI = "urn:recsys:openapi"
_REGISTRY: Registry = Registry().with_resource(_URI, Resource(contents=_DOC, specification=DRAFT202012))


def openapi() -> dict[str, Any]:
    return _DOC


def routes() -> dict[str, Any]:
    """The app's HTTP functions by name (discovered once per app object)."""
    http, _ = discover(function_app.app)
    return {f.name: f for f in http}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    def check(self, path: str, method: str) -> Answer:
        """Validate the body against the response schema of ``path``/``method``/status."""
        operation = _DOC["paths"][path][method.lower()]
        response = operation["responses"].get(str(self.status))
        assert response is not None, f"{method} {path} answered {self.status}, which openapi.json does not document"
        if "$ref" in response:
            response = _resolve(response["$ref"])
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            pointer = schema["$ref"] if "$ref" in schema else _pointer_to(schema)
            validator = jsonschema.Draft202012Validator(
                {"$ref": _URI + pointer}, registry=_REGISTRY,
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            validator.validate(self.body)
        for name in response.get("headers", {}):
            assert name.lower() in self.headers, f"{method} {path} {self.status} lacks the {name} header"
        return self


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = _DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _pointer_to(schema: dict[str, Any]) -> str:
    """A JSON pointer (in openapi.json) to an inline schema object."""
    def walk(node: Any, path: list[str]) -> list[str] | None:
        if node is schema:
            return path
        if isinstance(node, dict):
            for key, value in node.items():
                found = walk(value, [*path, key.replace("~", "~0").replace("/", "~1")])
                if found is not None:
                    return found
        elif isinstance(node, list):
            for index, value in enumerate(node):
                found = walk(value, [*path, str(index)])
                if found is not None:
                    return found
        return None

    found = walk(_DOC, [])
    assert found is not None
    return "#/" + "/".join(found)


async def call(
    name: str,
    *,
    method: str = "GET",
    route_params: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    body: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    query: list[tuple[str, str]] | None = None,
) -> Answer:
    """Run the handler of function ``name`` with a hand-built request; parse its JSON answer.

    ``query`` is a query string as pairs (names may repeat); it goes into the URL, as the host
    passes it, and its last value per name into ``params``.
    """
    function = routes()[name]
    route_params = route_params or {}
    path = "/api/" + re.sub(r"\{(\w+)[^}]*\}", lambda m: route_params[m.group(1)], function.route)
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    url = f"http://localhost:7071{path}"
    if query:
        url += "?" + urlencode(query)
        params = {**dict(query), **(params or {})}
    request = func.HttpRequest(
        method, url, headers=headers or {}, params=params or {},
        route_params=route_params, body=body or b"",
    )
    response = await function.handler(request)
    text = response.get_body().decode()
    return Answer(
        status=response.status_code,
        headers={key.lower(): value for key, value in response.headers.items()},
        body=json.loads(text) if text else None,
    )
