"""A real HTTP upstream on 127.0.0.1 for tests: routes are functions, requests are recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)
    method: str = "GET"
    body: bytes = b""


@dataclass
class Reply:
    status: int = 200
    body: bytes | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: Send the body one byte every this many seconds (a receiver that trickles).
    trickle: float = 0.0

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return msgspec.json.encode(self.body)


Route = Callable[[Request], Reply]


class Upstream:
    """``route(path, fn)``; ``base`` is the server's URL; ``requests`` what it received."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(
                    parts.path,
                    dict(parse_qsl(parts.query)),
                    {k.lower(): v for k, v in self.headers.items()},
                    method=self.command,
                    body=self.rfile.read(length) if length else b"",
                )
                upstream.requests.append(req)
                route = upstream.routes.get(parts.path)
                reply = route(req) if route else Reply(404, b'{"error": "no route"}')
                if reply.delay:
                    time.sleep(reply.delay)
                body = reply.encoded()
                self.send_response(reply.status)
                headers = {"content-type": "application/json"}
                headers.update((k.lower(), v) for k, v in reply.headers.items())
                for k, v in headers.items():
                    self.send_header(k, v)
                if "content-length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not reply.trickle:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(reply.trickle)
                except OSError:                     # the client gave up
                    pass

            do_POST = do_GET      # a webhook receiver: the body is recorded

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        # shutdown() waits for the loop to look at its flag: every 0.5 s by default, which
        # was most of the time of the corpus tests (a server per test).
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)

    def route(self, path: str, fn: Route) -> None:
        self.routes[path] = fn

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve() -> Iterator[Upstream]:
    with Upstream() as upstream:
        yield upstream
