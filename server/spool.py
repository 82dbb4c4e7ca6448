"""The disk spool: every sealed batch, one file each, from its seal until it is applied (at
once, or when the database is back).

A file is written under a temporary name, fsynced, renamed into place and the folder fsynced,
so a spooled batch survives a crash or power loss whole or not at all. Files are named by the
time they were spooled, so they are taken oldest first, and removed once applied. A batch
PostgreSQL rejects for good goes to ``dead-letter/`` beside them, with the error; moving such a
file back into the spool folder applies it again at the next start.

The worker processes of one server share the folder, each as an owner of its own files: a
file's name ends in its owner's token, and the owner holds an exclusive lock (``flock``) on
``owners/TOKEN.lock`` for as long as it runs, which the kernel lets go when it dies, however
it dies. A starting process adopts the files of owners gone (renaming them to its own token:
one adopter wins each file) and leaves a live sibling's alone, its batches under way and its
files in the making alike. The count and size of the files on disk are read when the spool
opens and then once per flush in a worker thread (:meth:`Spool.refresh`), not on each scrape
or readiness check; in between, this process's writes and removals keep them current.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from server.batch import Batch

log = logging.getLogger(__name__)

SUFFIX = ".batch"
PARTIAL = ".partial"
LOCK = ".lock"
# A file is written this much per system call. The kernel may not preempt a call (one built
# without preemption does not): writing a batch of 13 MB at once held the core the event loop
# runs on for up to tens of milliseconds.
WRITE_PIECE = 1 << 20


class Usage(NamedTuple):
    """What the spool folder holds, as last counted."""

    batches: int
    bytes: int


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.dead_letter_directory = directory / "dead-letter"
        self._owners = directory / "owners"
        self.max_bytes = max_bytes
        self._owners.mkdir(parents=True, exist_ok=True)
        self.dead_letter_directory.mkdir(exist_ok=True)
        while True:
            self.owner = secrets.token_hex(8)
            self._lock = self._owners / f"{self.owner}{LOCK}"
            descriptor = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _names(self._lock, descriptor):
                break
            # Another process, adopting, took the lock file for a dead owner's in the moment
            # between its making and its locking, and removed it: a new one.
            os.close(descriptor)
        self._let_go = weakref.finalize(self, os.close, descriptor)  # and the lock with it
        # write() and remove() run in worker threads, several at once: each counts its file
        # under the lock, so that none undoes another's count.
        self._counting = threading.Lock()
        self._changes = 0  # counted writes and removals, so refresh() can tell one ran meanwhile
        self.usage = self.scan()

    def paths(self) -> list[Path]:
        """The spooled batches on disk, oldest first, every owner's."""
        return sorted(self.directory.glob("*" + SUFFIX))

    def adopt(self) -> list[Path]:
        """Makes this process the owner of the files whose owners are gone (or that name
        none: written by an older version), and removes what those left half-written and
        their locks; returns this process's files, oldest first. Blocking: call it when the
        spool opens, or from a thread."""
        with _Owners(self._owners, self.owner) as owners:
            for partial in [
                *self.directory.glob("*" + PARTIAL),
                *self.dead_letter_directory.glob("*" + PARTIAL),
            ]:
                if not owners.alive(_owner_of(partial.name.removesuffix(PARTIAL))):
                    # A write cut short by a crash: never renamed, never counted.
                    partial.unlink(missing_ok=True)
            for path in self.paths():
                if owners.alive(_owner_of(path.name)):
                    continue
                try:
                    os.rename(path, self._named(path.name.partition(".")[0], self.directory))
                except FileNotFoundError:
                    pass  # adopted by another process
                except OSError as error:
                    log.error("cannot adopt spool file %s: %s; it is left as it is", path, error)
        return [path for path in self.paths() if _owner_of(path.name) == self.owner]

    def close(self) -> None:
        """Gives up this process's ownership: its files left (a database still away at
        shutdown) go to whichever process starts next."""
        self._lock.unlink(missing_ok=True)
        self._let_go()

    def _named(self, stem: str, folder: Path) -> Path:
        """The file in ``folder`` named ``stem`` (``NANOSECONDS-BATCH_ID``), owned by this
        process."""
        return folder / f"{stem}.{self.owner}{SUFFIX}"

    def scan(self) -> Usage:
        """Counts the files on disk, so processes sharing the folder all see the same figures.
        Blocking: call it from a thread, or :meth:`refresh`."""
        paths = self.paths()
        total = 0
        for path in paths:
            total += _size(path)
        return Usage(len(paths), total)

    async def refresh(self) -> None:
        """Counts the files on disk again, in a worker thread. A count that one of this
        process's writes or removals ran across may or may not hold its file: it is dropped,
        and the figures those keep current stand until the next refresh."""
        changes = self._changes
        try:
            usage = await asyncio.to_thread(self.scan)
        except OSError as error:
            log.error(
                "cannot list spool %s: %s; its figures are not current", self.directory, error
            )
            return
        with self._counting:
            if self._changes == changes:
                self.usage = usage

    @property
    def batches(self) -> int:
        return self.usage.batches

    @property
    def bytes(self) -> int:
        return self.usage.bytes

    @property
    def over_budget(self) -> bool:
        return self.usage.bytes >= self.max_bytes

    def write(self, batch: Batch) -> Path:
        """Writes a batch durably and counts it; returns its file. Blocking: call it from a
        thread."""
        path = self._named(f"{time.time_ns():020d}-{batch.batch_id}", self.directory)
        pieces = batch.spool_pieces()
        _write_durably(path, pieces)
        self._count(1, sum(map(len, pieces)))
        return path

    def _count(self, batches: int, size: int) -> None:
        with self._counting:
            self.usage = Usage(self.usage.batches + batches, self.usage.bytes + size)
            self._changes += 1

    def read(self, path: Path) -> Batch:
        with path.open("rb") as file:
            return Batch.read(file, os.fstat(file.fileno()).st_size)

    def remove(self, path: Path) -> None:
        """Forgets an applied batch (another process may have removed it already)."""
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self._count(-1, -size)

    def dead_letter(self, batch: Batch, error: str) -> Path:
        """Keeps a batch PostgreSQL rejected, with the error, out of the way of the others
        (its spool file, if any, is for the caller to remove once this returns)."""
        target = self._named(f"{time.time_ns():020d}-{batch.batch_id}", self.dead_letter_directory)
        _write_durably(target, batch.spool_pieces(error=error))
        return target

    def quarantine(self, path: Path) -> Path:
        """Moves an unreadable spool file to the dead letters as it is."""
        target = self.dead_letter_directory / path.name
        size = _size(path)
        os.replace(path, target)
        self._count(-1, -size)
        return target


def _size(path: Path) -> int:
    """A spooled file's size as counted: 0 for one that is gone (applied meanwhile by another
    process) or cannot be read (the flusher moves it to the dead letters when it takes it)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _names(path: Path, descriptor: int) -> bool:
    """Whether ``path`` names the file open as ``descriptor``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(descriptor))
    except FileNotFoundError:
        return False


def _owner_of(name: str) -> str | None:
    """The owner token a spool file's name ends in (``NANOSECONDS-BATCH_ID.OWNER.batch``);
    None for a name that carries none."""
    stem = name.removesuffix(SUFFIX)
    owner = stem.rpartition(".")[2] if "." in stem else ""
    return owner if len(owner) == 16 and all(c in "0123456789abcdef" for c in owner) else None


class _Owners:
    """Which owners of spool files are alive, asked of their locks. An owner found gone has
    its lock taken, so that no other process takes it for gone at the same time, until the
    files are adopted; then the lock is removed."""

    def __init__(self, folder: Path, me: str) -> None:
        self._folder = folder
        self._me = me
        self._alive: dict[str, bool] = {}
        self._gone: dict[str, int] = {}  # owner: its lock, held

    def __enter__(self) -> _Owners:
        try:
            for lock in self._folder.glob("*" + LOCK):
                self.alive(lock.name.removesuffix(LOCK))
        except BaseException:
            self.__exit__()
            raise
        return self

    def alive(self, owner: str | None) -> bool:
        if owner is None:
            return False
        if owner == self._me:
            return True
        if owner not in self._alive:
            self._alive[owner] = self._probe(owner)
        return self._alive[owner]

    def _probe(self, owner: str) -> bool:
        try:
            descriptor = os.open(self._folder / f"{owner}{LOCK}", os.O_RDONLY)
        except FileNotFoundError:
            return False  # closed cleanly, or adopted already
        except OSError:
            return True  # another user's, say: left alone
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: alive (or a lock not to be had: left alone)
            os.close(descriptor)
            return True
        self._gone[owner] = descriptor
        return False

    def __exit__(self, *exc_info: object) -> None:
        for owner, descriptor in self._gone.items():
            with contextlib.suppress(OSError):  # one left is probed again, and found gone
                (self._folder / f"{owner}{LOCK}").unlink(missing_ok=True)
            os.close(descriptor)


def _write_durably(path: Path, pieces: Iterable[bytes]) -> None:
    partial = path.with_name(path.name + PARTIAL)
    try:
        with open(partial, "wb") as file:
            for piece in pieces:
                view = memoryview(piece)
                for start in range(0, len(view), WRITE_PIECE):
                    file.write(view[start : start + WRITE_PIECE])
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk keeps no part of a batch it refused
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
