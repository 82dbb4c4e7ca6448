"""Connection strings in logs and pages: never with their password."""

from __future__ import annotations

import pytest

from server import config
from server.dsn import redact


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/pixels", "postgresql://app:***@db:5432/pixels"),
        # Not percent-encoded, as operators paste them: base64 secrets hold "/", others "#?@".
        ("postgresql://app:Zm9v/YmFy@db/pixels", "postgresql://app:***@db/pixels"),
        ("postgres://app:a#b?c@d@db:5432/pixels", "postgres://app:***@db:5432/pixels"),
        ("postgresql://u:p@[bad/db", "postgresql://u:***@[bad/db"),
        ("postgresql://app@db/pixels", "postgresql://app@db/pixels"),
        ("postgresql://db:5432/pixels", "postgresql://db:5432/pixels"),
        (
            "postgresql:///pixels?host=/run/pg&password=s3cret",
            "postgresql:///pixels?host=/run/pg&password=***",
        ),
        ("host=db password=s3cret dbname=pixels", "host=db password=*** dbname=pixels"),
        ("host=db password='s3 cret' dbname=pixels", "host=db password=*** dbname=pixels"),
    ],
)
def test_the_password_is_hidden(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cret@db:5432/pixels",
        "postgresql://app:s%2Fcret@db/pixels",
        "postgresql://app:s3cret@db1:5432,db2/pixels",  # several hosts
        "postgresql:///pixels?host=/run/pg",
        "host=db password=s3/cr#et dbname=pixels",
        "",
    ],
)
def test_a_readable_connection_string_is_taken(dsn: str) -> None:
    assert config.parse(["--dsn", dsn]).dsn == dsn


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:Zm9v/YmFy@db:5432/pixels",
        "postgresql://app:p4ss@[db/pixels",
        "postgresql://app:Zm9v@YmFy@db/pixels",
    ],
)
def test_an_unreadable_connection_string_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(ValueError, match=r"^--dsn: cannot read the URL postgresql://app:\*\*\*@"):
        config.parse(["--dsn", dsn])
    with pytest.raises(ValueError) as refused:
        config.parse([], {"PIXEL_DSN": dsn})
    assert "Zm9v" not in str(refused.value) and "p4ss" not in str(refused.value)
