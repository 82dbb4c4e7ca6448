# pixel-server: the builder compiles the wheel with the Cython extension (and the wheels of its
# dependencies); the runtime image installs them and runs as a non-root user. Every setting is a
# PIXEL_* variable (see the README). Give it a stop timeout longer than PIXEL_SHUTDOWN_TIMEOUT
# (docker run --stop-timeout 15, or stop_grace_period in compose.yaml) so the final flush runs.

FROM python:3.11-slim AS builder
# The compiler comes from the base image's own Debian release; pinning its exact version would
# break at every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY server ./server
COPY _fastcount ./_fastcount
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 pixel
COPY --from=builder /wheels /wheels
# Only the wheels built above can be installed (--no-index): they are the pins.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels pixel-server \
    && rm -rf /wheels
USER 10001
WORKDIR /home/pixel
# The admin port listens on all interfaces inside the container: publish it to the private
# network only. Without PIXEL_DSN the embedded PostgreSQL keeps its data in /home/pixel/data.
ENV PIXEL_HOST=0.0.0.0 \
    PIXEL_PORT=8080 \
    PIXEL_ADMIN_HOST=0.0.0.0 \
    PIXEL_ADMIN_PORT=9100 \
    PIXEL_DATA_DIR=/home/pixel/data \
    PIXEL_SHUTDOWN_TIMEOUT=10
VOLUME ["/home/pixel/data"]
EXPOSE 8080 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pixel-server", "serve"]
