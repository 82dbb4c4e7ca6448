"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from aiohttp import web

from server.app_keys import FLUSHER, METRICS


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves."""
    request.app[METRICS].requests["/healthz"] += 1
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 while flushing keeps up; 503 while the database cannot be reached."""
    request.app[METRICS].requests["/readyz"] += 1
    flusher = request.app[FLUSHER]
    if flusher.ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: {flusher.problem}\n")
