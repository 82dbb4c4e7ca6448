"""In-process metrics, rendered in the Prometheus text exposition format on the admin port.

Counters only ever grow; gauges are read at scrape time. Names and layout are those of the
Prometheus client libraries: ``_total`` counters, base units (``_seconds``, ``_bytes``),
histograms as cumulative ``_bucket{le="..."}`` lines with ``_sum`` and ``_count``, and the
standard ``process_*`` metrics.

Hot paths pay one dict or integer increment per request; everything else is worked out at
scrape time. Several worker processes each take :meth:`Metrics.snapshot` (plain data: it
pickles and goes through JSON), and whoever answers the scrape renders
``render(merge(snapshots))``: counters and histograms add up, gauges add up or keep the
largest or smallest value, as each one says.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, TypedDict

Kind = Literal["counter", "gauge", "histogram"]
# How a gauge's values from several processes combine; counters and histograms add up.
Merge = Literal["sum", "max", "min"]


class Sample(TypedDict):
    labels: list[str]  # the label values, in the order of the family's label names
    value: float


class Family(TypedDict):
    """One metric of a snapshot. ``buckets``, ``counts`` and ``sum`` are a histogram's."""

    type: Kind
    help: str
    merge: Merge
    labels: list[str]
    samples: list[Sample]
    buckets: list[float]  # upper bounds; +Inf is implied
    counts: list[int]  # observations per bucket, not cumulative; the last is over every bound
    sum: float


# Metric name -> family, in the order they are rendered.
Snapshot = dict[str, Family]

# The endpoints whose requests are counted (pixel_requests_total{endpoint}).
ENDPOINTS = ("/i.gif", "/v.gif", "/v.js", "/c", "/healthz", "/readyz")
# The counter engine's fields, in its column order, as (endpoint, type) labels.
EVENT_LABELS = (
    ("/i.gif", "impression"),
    ("/i.gif", "givt_impression"),
    ("/v.gif", "measurable"),
    ("/v.gif", "viewable"),
    ("/c", "click"),
    ("/c", "givt_click"),
)
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FLUSH_ROWS_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


class Histogram:
    """Observations counted per bucket; rendered cumulative, as Prometheus wants them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = [float(bound) for bound in buckets]
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is "<=").
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class Metrics:
    """The metrics of one process. Counting is a plain attribute or ``Counter`` increment."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter(dict.fromkeys(ENDPOINTS, 0))
        # Per counter field, in EVENT_LABELS order. Added up from each window as it is sealed
        # (batch.seal), so the pixel pays no second increment for them.
        self.events = [0] * len(EVENT_LABELS)
        self.rejected: Counter[str] = Counter()
        self.givt: Counter[str] = Counter()
        self.http_errors: Counter[str] = Counter()  # by status
        self.flushes = 0
        self.flush_failures = 0
        self.flushed_rows = 0
        self.flush_seconds = Histogram(FLUSH_SECONDS_BUCKETS)
        self.flush_rows = Histogram(FLUSH_ROWS_BUCKETS)
        self.last_flush = 0.0  # unix time of the last batch applied; 0 before the first
        self.overflowed = 0
        self.dropped = 0
        self.dead_lettered = 0
        self.started = time.time()
        self.gauges: dict[str, tuple[str, Callable[[], float], Merge]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float], merge: Merge = "sum") -> None:
        """Registers a gauge whose value is read at scrape time; ``merge`` says how the values
        of several processes combine."""
        self.gauges[name] = (help, read, merge)

    def flushed(self, rows: int, seconds: float) -> None:
        """Records a batch of ``rows`` rows applied to PostgreSQL in ``seconds``."""
        self.flushes += 1
        self.flushed_rows += rows
        self.flush_seconds.observe(seconds)
        self.flush_rows.observe(rows)
        self.last_flush = time.time()

    def render(self) -> str:
        """This process's metrics in the Prometheus text format."""
        return render(self.snapshot())

    def snapshot(self) -> Snapshot:
        """Every metric's value now, as plain data: see :func:`merge` and :func:`render`."""
        families: Snapshot = {}

        def counter(name: str, help: str, value: float) -> None:
            families[name] = _family("counter", help, (), [((), value)])

        def gauge(name: str, help: str, value: float, merge: Merge = "sum") -> None:
            families[name] = _family("gauge", help, (), [((), value)], merge)

        def by_label(name: str, help: str, label: str, counts: Counter[str]) -> None:
            samples = (((value,), count) for value, count in counts.items())
            families[name] = _family("counter", help, (label,), samples)

        by_label(
            "pixel_requests_total", "Requests answered, by endpoint", "endpoint", self.requests
        )
        families["pixel_events_total"] = _family(
            "counter",
            "Events counted, by endpoint and type; added when a window is sealed (every flush)",
            ("endpoint", "type"),
            zip(EVENT_LABELS, self.events, strict=True),
        )
        by_label(
            "pixel_rejected_requests_total",
            "Pixel requests answered but not counted, by reason",
            "reason",
            self.rejected,
        )
        by_label(
            "pixel_givt_requests_total",
            "Requests counted as general invalid traffic, by reason",
            "reason",
            self.givt,
        )
        by_label(
            "pixel_http_errors_total",
            "Requests the HTTP layer answered with an error of its own, by status: a request"
            " its parser refuses (400), a handler that timed out (504), a fault of the server"
            " (500)",
            "status",
            self.http_errors,
        )
        counter("pixel_flushes_total", "Flush batches applied to PostgreSQL", self.flushes)
        counter(
            "pixel_flush_failures_total", "Failed attempts to apply a batch", self.flush_failures
        )
        counter("pixel_flushed_rows_total", "Rows merged into pixel_counts", self.flushed_rows)
        families["pixel_flush_duration_seconds"] = _histogram(
            "Time to apply one batch to PostgreSQL", self.flush_seconds
        )
        families["pixel_flush_rows"] = _histogram("Rows per batch applied", self.flush_rows)
        gauge(
            "pixel_last_flush_timestamp_seconds",
            "Unix time of the last batch applied (0: none yet)",
            self.last_flush,
            "max",
        )
        counter(
            "pixel_overflow_increments_total",
            "Increments sent to the __overflow__ row by the key cap",
            self.overflowed,
        )
        counter(
            "pixel_dropped_rows_total", "Rows that could not be kept (normally 0)", self.dropped
        )
        counter(
            "pixel_dead_lettered_batches_total",
            "Batches moved to the dead-letter folder: rejected by PostgreSQL, unreadable, or"
            " spooled before the ledger's pruned rows",
            self.dead_lettered,
        )
        for name, (help, read, merge) in self.gauges.items():
            gauge(name, help, read(), merge)
        cpu = os.times()
        counter(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds",
            cpu.user + cpu.system,
        )
        for name, help, read in _PROCESS_GAUGES:
            with contextlib.suppress(OSError):  # not Linux: no /proc
                gauge(name, help, read())
        gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.started,
            "min",
        )
        return families


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The snapshots of several processes as one: counters and histograms add up, and gauges
    combine as their ``merge`` says. Raises ``ValueError`` for histograms whose buckets differ.

    >>> one, two = Metrics(), Metrics()
    >>> one.requests["/i.gif"] += 2
    >>> two.requests["/i.gif"] += 3
    >>> value(merge([one.snapshot(), two.snapshot()]), "pixel_requests_total", "/i.gif")
    5
    """
    merged: Snapshot = {}
    for snapshot in snapshots:
        for name, family in snapshot.items():
            into = merged.get(name)
            if into is None:
                merged[name] = _family(
                    family["type"],
                    family["help"],
                    family["labels"],
                    ((sample["labels"], sample["value"]) for sample in family["samples"]),
                    family["merge"],
                    family["buckets"],
                    family["counts"],
                    family["sum"],
                )
            elif family["type"] == "histogram":
                if family["buckets"] != into["buckets"]:
                    raise ValueError(f"{name}: cannot merge histograms with different buckets")
                into["counts"] = [
                    a + b for a, b in zip(into["counts"], family["counts"], strict=True)
                ]
                into["sum"] += family["sum"]
            else:
                combine = _COMBINE[into["merge"] if into["type"] == "gauge" else "sum"]
                values = {tuple(sample["labels"]): sample["value"] for sample in into["samples"]}
                for sample in family["samples"]:
                    key = tuple(sample["labels"])
                    values[key] = (
                        combine(values[key], sample["value"]) if key in values else sample["value"]
                    )
                into["samples"] = [Sample(labels=list(key), value=v) for key, v in values.items()]
    return merged


def render(snapshot: Snapshot) -> str:
    """A snapshot in the Prometheus text exposition format (version 0.0.4)."""
    return "".join(line + "\n" for line in _lines(snapshot))


def value(snapshot: Snapshot, name: str, *labels: str) -> float:
    """The value of one sample of a counter or gauge; 0 where it has none."""
    family = snapshot.get(name)
    for sample in family["samples"] if family else ():
        if tuple(sample["labels"]) == labels:
            return sample["value"]
    return 0


def _lines(snapshot: Snapshot) -> Iterator[str]:
    for name, family in snapshot.items():
        yield f"# HELP {name} {_escape_help(family['help'])}"
        yield f"# TYPE {name} {family['type']}"
        if family["type"] == "histogram":
            cumulative = 0
            for bound, count in zip([*family["buckets"], "+Inf"], family["counts"], strict=True):
                cumulative += count
                yield f'{name}_bucket{{le="{bound}"}} {cumulative}'
            yield f"{name}_sum {_number(family['sum'])}"
            yield f"{name}_count {cumulative}"
            continue
        for sample in sorted(family["samples"], key=lambda sample: sample["labels"]):
            pairs = ",".join(
                f'{label}="{_escape(text)}"'
                for label, text in zip(family["labels"], sample["labels"], strict=True)
            )
            yield (
                f"{name}{{{pairs}}} {_number(sample['value'])}"
                if pairs
                else f"{name} {_number(sample['value'])}"
            )


def _family(
    kind: Kind,
    help: str,
    labels: Sequence[str],
    samples: Iterable[tuple[Sequence[str], float]],
    merge: Merge = "sum",
    buckets: Sequence[float] = (),
    counts: Sequence[int] = (),
    total: float = 0.0,
) -> Family:
    return Family(
        type=kind,
        help=help,
        merge=merge,
        labels=list(labels),
        samples=[Sample(labels=list(values), value=v) for values, v in samples],
        buckets=list(buckets),
        counts=list(counts),
        sum=total,
    )


def _histogram(help: str, histogram: Histogram) -> Family:
    return _family(
        "histogram", help, (), (), "sum", histogram.buckets, histogram.counts, histogram.sum
    )


_COMBINE: dict[Merge, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_fds() -> float:
    return len(os.listdir("/proc/self/fd"))


_PROCESS_GAUGES: tuple[tuple[str, str, Callable[[], float]], ...] = (
    ("process_resident_memory_bytes", "Resident memory size in bytes", resident_bytes),
    ("process_open_fds", "Number of open file descriptors", _open_fds),
)


def _number(number: float) -> str:
    """Integers as integers (exact up to 2**53), other values as Python writes floats."""
    if isinstance(number, int) or (number.is_integer() and abs(number) < 2**53):
        return str(int(number))
    return repr(number)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape(label_value: str) -> str:
    return _escape_help(label_value).replace('"', '\\"')
