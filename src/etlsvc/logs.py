"""Structured logs: one JSON object per line on stdout (or coloured text on a terminal).

Owns the structlog configuration and the redaction of secrets. Every module logs through
``structlog.get_logger()``; run and request context is bound with contextvars.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import msgspec
import structlog

from etlsvc.logtail import HUB

#: ``scheme://user:password@host``: the password of a URL's userinfo.
_USERINFO = re.compile(r"(?P<keep>[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]*@", re.I)
#: ``password=…`` as a URL query parameter or a libpq ``key=value`` word, quoted or not.
_PASSWORD_PARAM = re.compile(
    r"(?P<keep>\b(?:password|passwd|pwd|sslpassword|passphrase)\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&\s'\"]+)", re.I)
_SECRET_KEYS = re.compile(r"pass|secret|token|api_?key|authorization", re.I)


def redact(text: str) -> str:
    """``text`` with every password of a URL or DSN in it masked: a URL's userinfo
    (``postgresql://u:***@h``), a query parameter (``?password=***``) and a libpq
    ``key=value`` string (``host=h password=***``)."""
    if "=" in text or "@" in text:
        text = _PASSWORD_PARAM.sub(r"\g<keep>***", _USERINFO.sub(r"\g<keep>:***@", text))
    return text


def _redact_event(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if _SECRET_KEYS.search(key) and value:
            event[key] = "***"
        elif isinstance(value, str):
            event[key] = redact(value)
    return event


def _json_dumps(obj: Any, **_: Any) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


# Structured tracebacks without local variables: locals can hold secrets and rows of data.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Send structlog (and stdlib logging) to ``stream`` (stdout) as JSON lines or console text."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=stream.isatty()) if fmt == "console"
                     else structlog.processors.JSONRenderer(serializer=_json_dumps))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_event,
    ]
    structlog.configure(
        processors=[*shared, HUB.processor, _TRACEBACKS, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library end up in the same stream and format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, HUB.processor]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.getLevelName(level.upper()), logging.INFO))
