"""Real ``pixel-server serve`` processes, and what /proc says of a process, for the load
programs and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PIXEL_SERVER = str(Path(sys.executable).parent / "pixel-server")


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a /proc stat file after the command's name, which is in parentheses and may
    hold spaces: the state, the parent's pid, and so on (proc(5) numbers them from 3)."""
    return Path(path).read_text().rpartition(")")[2].split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PixelServer:
    """A ``pixel-server serve`` process on free loopback ports, its log in a file."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            PIXEL_SERVER,
            "serve",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--admin-port={self.admin_port}",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            self.wait_until_serving()
        except BaseException:
            self.kill()  # never left running behind an object its caller never got
            raise

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pixel-server exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"pixel-server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then waits for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
