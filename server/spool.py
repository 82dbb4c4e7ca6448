"""The disk spool: sealed batches that could not be applied yet, one file each.

A file is written under a temporary name, fsynced, renamed into place and the folder fsynced,
so a spooled batch survives a crash or power loss whole or not at all. Files are named by the
time they were spooled, so they are applied oldest first, and removed once applied. A batch
PostgreSQL rejects for good goes to ``dead-letter/`` beside them, with the error; moving such a
file back into the spool folder applies it again at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from server.batch import Batch

log = logging.getLogger(__name__)

SUFFIX = ".batch"


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.dead_letter_directory = directory / "dead-letter"
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.dead_letter_directory.mkdir(exist_ok=True)
        for partial in directory.glob("*.partial"):
            partial.unlink()  # a write cut short by a crash: never renamed, never counted

    def paths(self) -> list[Path]:
        """The spooled batches on disk, oldest first."""
        return sorted(self.directory.glob("*" + SUFFIX))

    @property
    def batches(self) -> int:
        """Counted on disk, so processes sharing the folder all see the same figure."""
        return len(self.paths())

    @property
    def bytes(self) -> int:
        total = 0
        for path in self.paths():
            with contextlib.suppress(FileNotFoundError):  # applied meanwhile by another process
                total += path.stat().st_size
        return total

    @property
    def over_budget(self) -> bool:
        return self.bytes >= self.max_bytes

    def write(self, batch: Batch) -> Path:
        """Writes a batch durably; returns its file. Blocking: call it from a thread."""
        path = self.directory / f"{time.time_ns():020d}-{batch.batch_id}{SUFFIX}"
        _write_durably(path, batch.to_bytes())
        return path

    def read(self, path: Path) -> Batch:
        return Batch.from_bytes(path.read_bytes())

    def remove(self, path: Path) -> None:
        """Forgets an applied batch (another process may have removed it already)."""
        path.unlink(missing_ok=True)

    def dead_letter(self, batch: Batch, error: str, path: Path | None) -> Path:
        """Keeps a batch PostgreSQL rejected, with the error, out of the way of the others."""
        target = self.dead_letter_directory / f"{time.time_ns():020d}-{batch.batch_id}{SUFFIX}"
        _write_durably(target, batch.to_bytes(error=error))
        if path is not None:
            self.remove(path)
        return target

    def quarantine(self, path: Path) -> Path:
        """Moves an unreadable spool file to the dead letters as it is."""
        target = self.dead_letter_directory / path.name
        os.replace(path, target)
        return target


def _write_durably(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
