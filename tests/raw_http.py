"""Raw HTTP over a socket, for the tests that must see exact bytes or send broken ones."""

from __future__ import annotations

import socket
import time

# Between two pieces sent apart, so that the server reads them apart.
PIECE_PAUSE = 0.05


def exchange(port: int, request: bytes | list[bytes], idle: float = 5.0) -> bytes:
    """Sends raw bytes, or each of a list of pieces on its own, a moment apart; returns what
    the server answers until it closes the connection or stays silent for ``idle`` seconds
    (an incomplete request, or a kept-alive connection)."""
    pieces = [request] if isinstance(request, bytes) else request
    with socket.create_connection(("127.0.0.1", port), timeout=idle) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunks = []
        try:
            for number, piece in enumerate(pieces):
                if number:
                    time.sleep(PIECE_PAUSE)
                connection.sendall(piece)
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


def status_codes(answer: bytes) -> list[int]:
    return [
        int(line.split(b" ")[1])
        for line in answer.split(b"\r\n")
        if line.startswith(b"HTTP/1.") and len(line.split(b" ")) > 1
    ]


def split(answer: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    return status.encode(), headers, body
