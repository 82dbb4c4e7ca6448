"""In-process metrics, rendered in the Prometheus text exposition format on the admin port.

Counters only ever grow; gauges are read at scrape time. Names follow Prometheus conventions
(``_total`` for counters, base units).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator


class Metrics:
    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.givt: Counter[str] = Counter()
        self.flushes = 0
        self.flush_failures = 0
        self.flushed_rows = 0
        self.overflowed = 0
        self.dropped = 0
        self.dead_lettered = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """Registers a gauge whose value is read at scrape time."""
        self.gauges[name] = (help, read)

    def render(self) -> str:
        return "".join(line + "\n" for line in self._lines())

    def _lines(self) -> Iterator[str]:
        yield from _counter(
            "pixel_rejected_requests_total",
            "Pixel requests answered but not counted, by reason",
            "reason",
            self.rejected,
        )
        yield from _counter(
            "pixel_givt_requests_total",
            "Requests counted as general invalid traffic, by reason",
            "reason",
            self.givt,
        )
        for name, help, value in (
            ("pixel_flushes_total", "Flush batches applied to PostgreSQL", self.flushes),
            ("pixel_flush_failures_total", "Failed attempts to apply a batch", self.flush_failures),
            ("pixel_flushed_rows_total", "Rows merged into pixel_counts", self.flushed_rows),
            (
                "pixel_overflow_increments_total",
                "Increments sent to the __overflow__ row by the key cap",
                self.overflowed,
            ),
            ("pixel_dropped_rows_total", "Rows that could not be kept (normally 0)", self.dropped),
            (
                "pixel_dead_lettered_batches_total",
                "Batches PostgreSQL rejected, kept in the dead-letter folder",
                self.dead_lettered,
            ),
        ):
            yield f"# HELP {name} {help}"
            yield f"# TYPE {name} counter"
            yield f"{name} {value}"
        for name, (help, read) in self.gauges.items():
            yield f"# HELP {name} {help}"
            yield f"# TYPE {name} gauge"
            yield f"{name} {read():g}"


def _counter(name: str, help: str, label: str, values: Counter[str]) -> Iterator[str]:
    yield f"# HELP {name} {help}"
    yield f"# TYPE {name} counter"
    for value, count in sorted(values.items()):
        yield f'{name}{{{label}="{_escape(value)}"}} {count}'


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
