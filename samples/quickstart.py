"""Quickstart: serve the sample API and feeds on 127.0.0.1:8765, then `etlsvc run` everything
(or, with ``serve``, `etlsvc serve` for as long as it runs: *Run now* in the console then
finds the samples' upstream too).

usage: python samples/quickstart.py [etlsvc run arguments…]
       python samples/quickstart.py serve [etlsvc serve arguments…]
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
        args = sys.argv[1:]
        command, rest = ("serve", args[1:]) if args[:1] == ["serve"] else ("run", args)
        return cli.main([command, "--config", str(HERE.parent / "config.toml"), *rest])
    finally:
        server.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
