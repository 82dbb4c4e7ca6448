"""Logging for the ``pixel-server`` process (library modules only create named loggers)."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class MalformedRequestFilter(logging.Filter):
    """Turns aiohttp's report of a malformed request into one DEBUG line without a traceback.

    aiohttp logs every request its parser refuses at ERROR with a traceback, though the client
    already got its 4xx. On a public port such requests are routine (scanners, TLS to a plain
    port), and a flood of them must not flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.msg = f"{record.msg}: %s"
        record.args = (*(record.args or ()), ascii(error.message))
        record.exc_info = None
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return True


def describe(error: BaseException) -> str:
    """An error as one line for people: its type, and its message when it has one."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def configure(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
