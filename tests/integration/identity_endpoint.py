"""A local stand-in for the managed identity endpoint of App Service / Azure Functions.

It speaks the protocol ``ManagedIdentityCredential`` uses there (``IDENTITY_ENDPOINT``,
``X-IDENTITY-HEADER``, ``api-version=2019-08-01``, ``resource``, ``client_id``) and hands out
what ``issue`` returns, so the real azure-identity fetches the tokens.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["ManagedIdentityEndpoint"]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on its answer closed the socket


@dataclass
class ManagedIdentityEndpoint:
    """Serves tokens of ``issue()`` for ``resource`` to the user-assigned identity ``client_id``."""

    resource: str
    client_id: str
    issue: Callable[[], tuple[int, dict[str, Any]]]
    header: str = field(default_factory=lambda: secrets.token_hex(16))
    requests: int = 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Yields the endpoint URL (the value of ``IDENTITY_ENDPOINT``)."""
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                if self.headers.get("X-IDENTITY-HEADER") != endpoint.header:
                    status, body = 401, {"statusCode": 401, "message": "missing or wrong X-IDENTITY-HEADER"}
                elif query.get("api-version") != ["2019-08-01"] or query.get("resource") != [endpoint.resource]:
                    status, body = 400, {"statusCode": 400, "message": f"unexpected query {query}"}
                elif query.get("client_id") != [endpoint.client_id]:
                    status, body = 400, {"statusCode": 400, "message": "unknown user-assigned identity"}
                else:
                    endpoint.requests += 1
                    status, body = endpoint.issue()
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = _QuietServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/msi/token"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
