"""Connection strings as shown to people: never with their password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact(dsn: str) -> str:
    """Hides the password of a URL or keyword/value connection string.

    >>> redact("postgresql://app:s3cret@db:5432/pixels")
    'postgresql://app:***@db:5432/pixels'
    >>> redact("host=db password=s3cret dbname=pixels")
    'host=db password=*** dbname=pixels'
    """
    if "://" not in dsn:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    parts = urlsplit(dsn)
    if parts.password is None:
        redacted = dsn
    else:
        userinfo = f"{parts.username or ''}:***"
        host = parts.netloc.rpartition("@")[2]
        redacted = urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", redacted)
