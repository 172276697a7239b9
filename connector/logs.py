"""Logging set-up: JSON lines by default, plain text on a terminal, secrets always redacted.

Messages are constant sentences; variables travel as fields (``extra=``). Only the CLI calls
``configure``; every module just uses ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["configure", "hold", "release", "JsonFormatter", "Redactor"]

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _forms(secret: str) -> set[str]:
    """The secret as it can appear in a message: raw, stripped, and escaped by ``repr`` of a
    str or of bytes (an HTTP library's "Illegal header value b'Bearer tok\\n'"), by JSON or by
    ``unicode_escape``."""
    out = set()
    for value in (secret, secret.strip()):
        out.add(value)
        out.add(repr(value)[1:-1])
        out.add(repr(value.encode("utf-8", "backslashreplace"))[2:-1])
        out.add(orjson.dumps(value).decode()[1:-1])
        out.add(value.encode("unicode_escape").decode("ascii"))
    return out


class Redactor(logging.Filter):
    """Replaces every configured secret value anywhere in a record with ``<redacted>``, in its
    raw form and in its escaped forms (``repr``, JSON)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        forms = {form for s in secrets if s for form in _forms(s)}
        # Longest first: a form containing a shorter one is replaced whole.
        self.secrets = sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "<redacted>")
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = self._clean(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STD:
                setattr(record, key, self._clean(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self._clean(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exception"] = record.exc_text
        return orjson.dumps(body, default=str).decode()


# Control characters (newlines, ANSI escapes) in a text line: stream data reaches the log in
# event names, ids and reasons, and must neither forge a line nor drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={_visible(str(v))}"
            for k, v in vars(record).items()
            if k not in _STD and not k.startswith("_")
        )
        message = _visible(record.getMessage())
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {message}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


class _Held(logging.Handler):
    """Records logged before ``configure``: while the settings load, which decide the format,
    a warning about them cannot be written in it yet. ``configure`` writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 1000:
            self.records.append(record)


def hold() -> None:
    """Hold what is logged until ``configure`` (when nothing else handles the logs yet)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_Held())


def release() -> None:
    """Write what is still held (a command that never configured its logs) as plain lines, as
    Python does for a program without logging set up."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _Held):
            root.removeHandler(old)
            for record in old.records:
                logging.lastResort.handle(record)  # type: ignore[union-attr]


def configure(
    level: str = "info", fmt: str = "auto", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    held = [r for old in root.handlers if isinstance(old, _Held) for r in old.records]
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for record in held:
        if record.levelno >= root.level:
            handler.handle(record)
    # Request lines of the HTTP libraries are noise at INFO (and never carry our tokens).
    for name in (
        "httpx",
        "httpcore",
        "botocore",
        "boto3",
        "urllib3",
        "apscheduler",
        "pycti",
        "api",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
