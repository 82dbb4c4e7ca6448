"""Connection strings as shown to people: never with their password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact(dsn: str) -> str:
    """Hides the password of a URL or keyword/value connection string.

    >>> redact("postgresql://app:s3cret@db:5432/pixels")
    'postgresql://app:***@db:5432/pixels'
    >>> redact("postgresql://app:s3/cr#et@db/pixels")
    'postgresql://app:***@db/pixels'
    >>> redact("host=db password=s3cret dbname=pixels")
    'host=db password=*** dbname=pixels'
    """
    if "://" not in dsn:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    # Not urlsplit(): a password with a "/", "?" or "#" in it, not percent-encoded, ends the
    # authority early there, and the password would be shown. Everything between the user's
    # name and the last "@" is hidden instead.
    scheme, _, rest = dsn.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{host}"
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", f"{scheme}://{rest}")


def check(dsn: str) -> str:
    """The connection string as given, if its URL form can be read (the driver reads it as
    ``urllib`` does); else a ValueError that shows no password."""
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            if parts.netloc.count("@") > 1:  # the driver's password would end at the first "@"
                raise ValueError
            if "," not in parts.netloc:  # several hosts: the driver reads each itself
                parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError:
            raise ValueError(
                f"cannot read the URL {redact(dsn)}: percent-encode a '/', '?', '#', '@', ':'"
                " or '[' in the user name or password (%2F, %3F, %23, %40, %3A, %5B)"
            ) from None
    return dsn
