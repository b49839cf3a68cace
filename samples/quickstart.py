"""Quickstart: serve the sample API and feeds on 127.0.0.1:8765, then `etlsvc run` everything.

usage: python samples/quickstart.py [etlsvc run arguments…]
"""

from __future__ import annotations

import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from etlsvc import cli

HERE = Path(__file__).resolve().parent
PORT = 8765


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    handler = functools.partial(_Quiet, directory=str(HERE / "http"))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", PORT), handler)
    except OSError as exc:
        print(f"quickstart: cannot serve the samples on 127.0.0.1:{PORT}: {exc}",
              file=sys.stderr)
        return 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return cli.main(["run", "--config", str(HERE.parent / "config.toml"), *sys.argv[1:]])
    finally:
        server.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
