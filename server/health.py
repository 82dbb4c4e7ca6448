"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from aiohttp import web

from server.app_keys import FLUSHER


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 while flushing keeps up; 503 while the database cannot be reached."""
    flusher = request.app[FLUSHER]
    if flusher.ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: {flusher.problem}\n")
