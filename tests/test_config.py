"""The settings registry: flags, PIXEL_* variables, validation, and the README's table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from server import config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    rows = {
        match[0]: match[1]
        for match in re.findall(r"^\| `(--[a-z-]+)` \| `(PIXEL_[A-Z_]+)` \|", readme, re.M)
    }
    assert rows == {setting.flag: setting.env for setting in config.SETTINGS}


def test_flag_beats_environment_beats_default() -> None:
    environ = {"PIXEL_PORT": "9000", "PIXEL_FLUSH_INTERVAL": "0.25"}
    parsed = config.parse(["--port", "9001"], environ)
    assert parsed.port == 9001
    assert parsed.flush_interval == 0.25
    assert parsed.bucket_seconds == config.Config().bucket_seconds == 60


def test_defaults_match_the_contract() -> None:
    defaults = config.parse([], {})
    assert (defaults.host, defaults.port) == ("0.0.0.0", 8080)
    assert (defaults.admin_host, defaults.admin_port) == ("127.0.0.1", 9100)
    assert defaults.flush_interval == 1.0
    assert defaults.access_log is False


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--flush-interval", "0"], {}, "--flush-interval: must be greater than 0"),
        ([], {"PIXEL_PORT": "70000"}, "PIXEL_PORT: must be a TCP port"),
        ([], {"PIXEL_MAX_KEYS": "many"}, "PIXEL_MAX_KEYS: invalid literal"),
        (["--access-log", "maybe"], {}, "--access-log: must be true or false"),
    ],
)
def test_invalid_values_name_their_source(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config.parse(argv, environ)


def test_a_switch_alone_turns_it_on_and_the_help_shows_defaults_as_the_readme_does() -> None:
    assert config.parse(["--access-log"]).access_log is True
    assert config.parse(["--access-log", "false"]).access_log is False
    assert config.parse([], {"PIXEL_ACCESS_LOG": "yes"}).access_log is True
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    shown = " ".join(parser.format_help().split())
    for default in (
        "(env PIXEL_ACCESS_LOG, default false)",
        "(env PIXEL_SECRET, default none)",
        "(env PIXEL_DSN, default empty)",
        "(env PIXEL_SPOOL_DIR, default none)",
        "(env PIXEL_PORT, default 8080)",
    ):
        assert default in shown
