"""The one registry of settings.

Every field of the frozen :class:`Config` is a setting: a command-line flag ``--name-with-dashes``
and an environment variable ``PIXEL_NAME``. The flag wins over the variable, the variable over the
default. The README documents each one, and a test keeps the two in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.dsn import check as check_dsn

ENV_PREFIX = "PIXEL_"
DEFAULT_DATA_DIR = Path("pixel-data")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port (0-65535), got {text!r}")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def _byte_size(text: str) -> int:
    """A size in bytes, with an optional K, M or G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    cleaned = text.strip().upper().removesuffix("B")
    factor = units.get(cleaned[-1:], 1)
    value = int(cleaned[:-1] if factor > 1 else cleaned) * factor
    if value < 1:
        raise ValueError(f"must be a positive size such as 1073741824 or 1G, got {text!r}")
    return value


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _comma_separated(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _host_names(text: str) -> tuple[str, ...]:
    return tuple(name.lower() for name in _comma_separated(text))


MIN_SECRET_LENGTH = 16


def parse_secret(text: str) -> tuple[str, ...]:
    """Comma-separated secrets: the first signs, every one verifies. Never echoed back."""
    secrets = _comma_separated(text)
    if any(len(secret) < MIN_SECRET_LENGTH for secret in secrets):
        raise ValueError(f"each secret must be at least {MIN_SECRET_LENGTH} characters long")
    return secrets


def _setting(default: Any, parse: Callable[[str], Any], help: str, *, secret: bool = False) -> Any:
    return dataclasses.field(
        default=default, repr=not secret, metadata={"parse": parse, "help": help}
    )


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = _setting("0.0.0.0", str, "address the pixel port listens on")
    port: int = _setting(8080, _port, "pixel port: /i.gif, /healthz, /readyz")
    admin_host: str = _setting("127.0.0.1", str, "address of the admin port (keep it private)")
    admin_port: int = _setting(9100, _port, "admin port: /metrics and the operator page")
    admin_names: tuple[str, ...] = _setting(
        (),
        _host_names,
        "more Host names the admin port answers to while it listens on loopback (a reverse"
        " proxy's that passes its own), comma-separated",
    )
    dsn: str = _setting(
        "",
        check_dsn,
        "PostgreSQL connection string; empty starts the embedded PostgreSQL in --data-dir",
    )
    data_dir: Path = _setting(
        DEFAULT_DATA_DIR,
        Path,
        "folder of the embedded PostgreSQL's data (its WAL up to about 4 GB)",
    )
    workers: int = _setting(
        1, positive_int, "processes sharing the pixel port (SO_REUSEPORT); each counts and flushes"
    )
    flush_interval: float = _setting(1.0, _positive_float, "seconds between flushes to PostgreSQL")
    flush_connections: int = _setting(
        2,
        positive_int,
        "connections each process merges batches over at once (a window of more than 100,000"
        " keys is several batches)",
    )
    bucket_seconds: int = _setting(60, positive_int, "width of a time bucket in seconds")
    max_keys: int = _setting(
        1_000_000,
        positive_int,
        "distinct keys per flush window; further new keys count in the __overflow__ row",
    )
    shutdown_timeout: float = _setting(
        10.0,
        _positive_float,
        "seconds to answer in-flight requests and make the final flush on SIGTERM",
    )
    keepalive_timeout: float = _setting(
        15.0, _positive_float, "seconds an idle keep-alive connection stays open"
    )
    access_log: bool = _setting(
        False, _bool, "log every request (costs throughput; off by default)"
    )
    spool_dir: Path | None = _setting(
        None, _optional_path, "folder of the disk spool; empty means <data-dir>/spool"
    )
    spool_max_bytes: int = _setting(
        1 << 30, _byte_size, "spool budget in bytes (K, M, G suffixes); over it /readyz is 503"
    )
    ledger_days: int = _setting(
        30,
        positive_int,
        "days the ledger (flush_batches) keeps an applied batch's id; a spooled batch written"
        " before the pruned rows is dead-lettered rather than risk counting it twice",
    )
    max_pending_batches: int = _setting(
        300,
        positive_int,
        "batches held in memory when the spool cannot take them; beyond, the oldest is dropped",
    )
    secret: tuple[str, ...] = _setting(
        (),
        parse_secret,
        "click-signing secrets, comma-separated: the first signs, all verify (rotation);"
        " none disables /c",
        secret=True,
    )
    log_level: str = _setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")

    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(field.name, field.default, field.metadata["parse"], field.metadata["help"])
    for field in dataclasses.fields(Config)
)


def add_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Adds one flag per setting (or per setting in ``names``); a flag left out is filled from
    the environment or default."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        switch = setting.parse is _bool  # --access-log alone turns it on
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.name.upper(),
            nargs="?" if switch else None,
            const="true" if switch else None,
            help=f"{setting.help} (env {setting.env}, default {_shown(setting.default)})",
        )


def _shown(default: Any) -> str:
    """A default as the help and the README show it."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if default is None or default == ():
        return "none"
    return str(default) if default != "" else "empty"


def from_namespace(
    namespace: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    names: Collection[str] | None = None,
) -> Config:
    """Builds the config from parsed flags, then ``PIXEL_*`` variables, then defaults; with
    ``names``, only those settings are read and the others keep their defaults.

    Raises ``ValueError`` naming the flag or variable when a value is invalid.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        raw = getattr(namespace, setting.name, None)
        source = setting.flag
        if raw is None:
            raw = environ.get(setting.env)
            source = setting.env
        if raw is None:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return Config(**values)


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Parses flags and environment into a :class:`Config` (for tests and embedding)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), environ)
