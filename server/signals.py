"""SIGTERM and SIGINT, which stop the server: heeded from its first step to its last.

Before the event loop runs (the embedded PostgreSQL starting, the apps being made) a signal
is noted, not acted on, for a process killed then would leave its database running with no
one to stop it; once the loop runs, a noted signal stops the server as one received then
does: the final flush, then the database stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

STOPPING = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def noted() -> Iterator[list[int]]:
    """SIGTERM and SIGINT noted in the list yielded, not acted on, for the duration."""
    received: list[int] = []
    previous = [
        signal.signal(signum, lambda signum, _: received.append(signum)) for signum in STOPPING
    ]
    try:
        yield received
    finally:
        for signum, handler in zip(STOPPING, previous, strict=True):
            signal.signal(signum, handler)


def stop_on_signals(stopping: asyncio.Event, received: list[int]) -> None:
    """Sets ``stopping`` at SIGTERM or SIGINT from now on, on the running loop, and at once
    if one was ``received`` (noted) before."""
    loop = asyncio.get_running_loop()
    for signum in STOPPING:
        loop.add_signal_handler(signum, stopping.set)
    if received:
        stopping.set()
