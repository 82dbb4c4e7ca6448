"""The counter engine: every case runs against the compiled and the pure-Python module."""

import doctest
import gc
import importlib
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import _fastcount
import _fastcount._counters_py
from server.batch import POSTGRES_EPOCH
from server.metrics import resident_bytes
from server.query import parse_dimensions
from tests.harness import FIRST_BUCKET, LAST_BUCKET, Row, copy_rows

NO_EXTENSIONS = _fastcount.NO_EXTENSIONS
PUBLIC_NAMES = {
    "CLICKS",
    "COLUMNS",
    "Counters",
    "GIVT_CLICKS",
    "GIVT_IMPRESSIONS",
    "IMPRESSIONS",
    "MEASURABLE",
    "OVERFLOW_CAMPAIGN",
    "QUERY_PARAMETERS",
    "VIEWABLE",
    "Window",
    "last_copy_tuple",
}
B = 1_700_000_000  # a bucket start


@pytest.fixture(params=["c", "py"], ids=["compiled", "pure-python"])
def counters_impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "c":
        if NO_EXTENSIONS:
            pytest.skip("FASTCOUNT_NO_EXTENSIONS is set")
        # An ImportError here is a failure, not a skip: the extension must be built.
        return importlib.import_module("_fastcount._counters_c")
    return _fastcount._counters_py


def drain_all(window: Any, limit: int = 1000) -> list[Row]:
    rows: list[Row] = []
    while batch := window.drain(limit):
        rows.extend(batch)
    return rows


def row(bucket: int, *dims: str, counts: tuple[int, ...] = (1, 0, 0, 0, 0, 0)) -> Row:
    campaign, creative, affiliate, sub_id = dims
    a, b, c, d, e, f = counts
    return (bucket, campaign, creative, affiliate, sub_id, a, b, c, d, e, f)


def totals(rows: list[Row]) -> list[int]:
    sums = [0] * 6
    for r in rows:
        for i, value in enumerate(r[5:]):
            sums[i] += value
    return sums


def drain_copy_all(window: Any, limit: int = 1000) -> bytes:
    chunks: list[bytes] = []
    while chunk := window.drain_copy(limit):
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ dispatch


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTCOUNT_NO_EXTENSIONS is set")
def test_compiled_module_is_the_one_loaded() -> None:
    import _fastcount._counters_c

    # Typed as objects: to mypy the package exports the pure-Python classes.
    loaded: tuple[object, object] = (_fastcount.Counters, _fastcount.Window)
    assert loaded[0] is _fastcount._counters_c.Counters
    assert loaded[1] is _fastcount._counters_c.Window


def test_reimport_with_no_extensions_uses_pure_python() -> None:
    code = (
        "import sys, _fastcount\n"
        "print(_fastcount.Counters.__module__, _fastcount.Window.__module__,"
        " '_fastcount._counters_c' in sys.modules)\n"
    )
    env = {**os.environ, "FASTCOUNT_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["_fastcount._counters_py", "_fastcount._counters_py", "False"]


def test_public_names(counters_impl: ModuleType) -> None:
    assert set(counters_impl.__all__) == PUBLIC_NAMES == set(_fastcount.__all__) - {"GetScanner"}
    py = _fastcount._counters_py
    for name in PUBLIC_NAMES - {"Counters", "Window", "last_copy_tuple"}:
        assert getattr(counters_impl, name) == getattr(py, name), name
    assert counters_impl.COLUMNS == (
        "impressions",
        "givt_impressions",
        "measurable",
        "viewable",
        "clicks",
        "givt_clicks",
    )
    assert [counters_impl.IMPRESSIONS, counters_impl.GIVT_CLICKS] == [0, 5]
    assert counters_impl.OVERFLOW_CAMPAIGN == "__overflow__"
    for cls in ("Counters", "Window"):
        public = {n for n in dir(getattr(counters_impl, cls)) if not n.startswith("_")}
        assert public == {n for n in dir(getattr(py, cls)) if not n.startswith("_")}


def test_package_docstring_example() -> None:
    assert doctest.testmod(_fastcount).failed == 0


# ------------------------------------------------------------------ counting


def test_every_field(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    for field in range(6):
        counters.add(B, "c", "cr", "a", "s", field, field + 1)
    counters.add(B, "c", "cr", "a", "s", counters_impl.VIEWABLE)
    assert len(counters) == 1
    assert drain_all(counters.swap()) == [row(B, "c", "cr", "a", "s", counts=(1, 2, 3, 5, 5, 6))]


def test_default_n_and_keywords(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(max_keys=10, shards=2)
    counters.add(B, "c", "cr", "a", "s", 0)
    counters.add(bucket=B, campaign="c", creative="cr", affiliate="a", sub_id="s", field=0, n=40)
    assert drain_all(counters.swap()) == [row(B, "c", "cr", "a", "s", counts=(41, 0, 0, 0, 0, 0))]


def test_buckets_are_part_of_the_key(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    buckets = [0, 60, B, B + 60, -60, LAST_BUCKET, FIRST_BUCKET]
    for i, bucket in enumerate(buckets):
        for _ in range(i + 1):
            counters.add(bucket, "c", "cr", "a", "s", 0)
    assert len(counters) == len(buckets)
    assert drain_all(counters.swap()) == [
        row(FIRST_BUCKET, "c", "cr", "a", "s", counts=(7, 0, 0, 0, 0, 0)),
        row(-60, "c", "cr", "a", "s", counts=(5, 0, 0, 0, 0, 0)),
        row(0, "c", "cr", "a", "s", counts=(1, 0, 0, 0, 0, 0)),
        row(60, "c", "cr", "a", "s", counts=(2, 0, 0, 0, 0, 0)),
        row(B, "c", "cr", "a", "s", counts=(3, 0, 0, 0, 0, 0)),
        row(B + 60, "c", "cr", "a", "s", counts=(4, 0, 0, 0, 0, 0)),
        row(LAST_BUCKET, "c", "cr", "a", "s", counts=(6, 0, 0, 0, 0, 0)),
    ]


def test_unicode_empty_and_nul_dimensions(counters_impl: ModuleType) -> None:
    keys = [
        ("été", "バナー", "партнёр", "😀"),
        ("", "", "", ""),
        ("a\x00b", "", "\x00", "x"),
        ("a", "", "\x00", "x"),
        ("\u00ff" * 300, "\U0010ffff", "ß", "é"),
        ("e\u0301", "", "", ""),  # e + combining accent: not the same str as "é"
        ("é", "", "", ""),
    ]
    counters = counters_impl.Counters()
    for i, key in enumerate(keys):
        for _ in range(i + 1):
            counters.add(B, *key, counters_impl.CLICKS)
    # By UTF-8 bytes: "" < "a" < "a\x00b" < "e\u0301" < "é" (C3 A9) < "été" < "ÿ" (C3 BF).
    expected = [row(B, *keys[i], counts=(0, 0, 0, 0, i + 1, 0)) for i in (1, 3, 2, 5, 6, 0, 4)]
    assert drain_all(counters.swap()) == expected


def test_keys_differing_only_by_field_boundaries(counters_impl: ModuleType) -> None:
    keys = [
        ("ab", "c", "", ""),
        ("a", "bc", "", ""),
        ("a", "b", "c", ""),
        ("abc", "", "", ""),
        ("", "abc", "", ""),
        ("", "", "abc", ""),
        ("", "", "", "abc"),
        ("", "", "ab", "c"),
        ("", "a", "", "bc"),
    ]
    counters = counters_impl.Counters(shards=1)
    for i, key in enumerate(keys):
        counters.add(B, *key, 0, i + 1)
    assert len(counters) == len(keys)
    assert drain_all(counters.swap()) == [
        row(B, "", "", "", "abc", counts=(7, 0, 0, 0, 0, 0)),
        row(B, "", "", "ab", "c", counts=(8, 0, 0, 0, 0, 0)),
        row(B, "", "", "abc", "", counts=(6, 0, 0, 0, 0, 0)),
        row(B, "", "a", "", "bc", counts=(9, 0, 0, 0, 0, 0)),
        row(B, "", "abc", "", "", counts=(5, 0, 0, 0, 0, 0)),
        row(B, "a", "b", "c", "", counts=(3, 0, 0, 0, 0, 0)),
        row(B, "a", "bc", "", "", counts=(2, 0, 0, 0, 0, 0)),
        row(B, "ab", "c", "", "", counts=(1, 0, 0, 0, 0, 0)),
        row(B, "abc", "", "", "", counts=(4, 0, 0, 0, 0, 0)),
    ]


def test_counts_are_int64(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "c", "", "", "", 0, 2**62)
    counters.add(B, "c", "", "", "", 0, 2**62 - 1)
    with pytest.raises(OverflowError):
        counters.add(B, "c", "", "", "", 0, 1)
    counters.add(B, "c", "", "", "", 1, 2**63 - 1)
    window = counters.swap()
    assert window.drain(1) == [row(B, "c", "", "", "", counts=(2**63 - 1, 2**63 - 1, 0, 0, 0, 0))]


def test_drained_strings_are_plain_str(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "c", "cr", "a", "s", 0)
    ((bucket, *rest),) = counters.swap().drain(10)
    assert type(bucket) is int
    assert all(type(value) in (str, int) for value in rest)
    assert [type(value) for value in rest[:4]] == [str] * 4


# -------------------------------------------------------- raw query strings


def test_add_query_counts_a_plain_query_as_add_would(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    data = b"GET /i.gif?cb=1&sub=s&cid=c&crid=cr&aff=a&x HTTP/1.1"
    start, end = data.index(b"?") + 1, data.index(b" HTTP")
    assert counters.add_query(B, data, start, end, counters_impl.IMPRESSIONS, 128) is True
    assert counters.add_query(B, b"cid=c&crid=cr&aff=a&sub=s", 0, 25, counters_impl.CLICKS, 128)
    counters.add(B, "c", "cr", "a", "s", counters_impl.IMPRESSIONS)
    assert drain_all(counters.swap()) == [row(B, "c", "cr", "a", "s", counts=(2, 0, 0, 0, 1, 0))]


@pytest.mark.parametrize(
    ("query", "dimensions"),
    [
        (b"", ("", "", "", "")),
        (b"cid", ("", "", "", "")),
        (b"cid=a=b&&sub=", ("a=b", "", "", "")),
        (b"cb=%zz\xff\x00 &cid=a&cid2=b", ("a", "", "", "")),
        (b"aff=" + b"x" * 128, ("", "", "x" * 128, "")),
        (b"sub=!$'()*,;:@/?~", ("", "", "", "!$'()*,;:@/?~")),
    ],
)
def test_add_query_shapes(
    counters_impl: ModuleType, query: bytes, dimensions: tuple[str, ...]
) -> None:
    counters = counters_impl.Counters()
    assert counters.add_query(B, query, 0, len(query), counters_impl.IMPRESSIONS, 128)
    assert drain_all(counters.swap()) == [row(B, *dimensions)]


@pytest.mark.parametrize(
    "query",
    [
        b"cid=a%20b",
        b"cid=a+b",
        b"cid=a b",
        b"cid=\xc3\xa9",
        b"cid=a\x00",
        b"cid=a&cid=b",
        b"c%69d=a",
        b"ci+d=a&cid=b",
        b"x\xff=1&cid=a",
        b"cid=" + b"x" * 129,
    ],
)
def test_add_query_leaves_other_queries_to_the_caller(
    counters_impl: ModuleType, query: bytes
) -> None:
    counters = counters_impl.Counters()
    assert counters.add_query(B, query, 0, len(query), counters_impl.IMPRESSIONS, 128) is False
    assert len(counters) == 0


def test_add_query_agrees_with_the_full_parse(counters_impl: ModuleType) -> None:
    """Whatever add_query takes, server.query parses to the same key; add() of that key
    then counts into the same row."""
    rng = random.Random(3)
    pieces = [b"cid", b"crid", b"aff", b"sub", b"cb", b"=", b"&", b"a", b"B", b"%2F", b"+"]
    pieces += [b"\xc3\xa9", b"\x00", b" ", b"~", b"c", b"d", b"x" * 60]
    taken = 0
    for _ in range(5000):
        query = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        counters = counters_impl.Counters()
        if not counters.add_query(B, query, 0, len(query), counters_impl.IMPRESSIONS, 128):
            assert len(counters) == 0
            continue
        taken += 1
        dimensions = parse_dimensions(query)
        counters.add(B, *dimensions, counters_impl.IMPRESSIONS)
        assert drain_all(counters.swap()) == [row(B, *dimensions, counts=(2, 0, 0, 0, 0, 0))]
    assert taken > 500


def test_add_query_errors(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    for start, end in ((-1, 3), (2, 1), (0, 4)):
        with pytest.raises(ValueError, match="not a slice"):
            counters.add_query(B, b"cid", start, end, 0, 128)
    with pytest.raises(ValueError, match="field"):
        counters.add_query(B, b"cid", 0, 3, 6, 128)
    with pytest.raises(TypeError):
        counters.add_query(B, "cid", 0, 3, 0, 128)
    with pytest.raises(OverflowError, match=r"C long$"):
        counters.add_query(2**63, b"cid", 0, 3, 0, 128)
    with pytest.raises(OverflowError, match=r"C ssize_t$"):
        counters.add_query(B, b"cid", 0, 2**63, 0, 128)
    assert len(counters) == 0


# ---------------------------------------------------------------- swap, drain


def test_swap_starts_an_empty_window(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "c", "cr", "a", "s", 0)
    counters.add(B, "c", "cr", "a", "t", 0)
    first = counters.swap()
    assert (len(counters), len(first)) == (0, 2)
    counters.add(B, "c", "cr", "a", "s", 0, 5)
    second = counters.swap()
    assert drain_all(second) == [row(B, "c", "cr", "a", "s", counts=(5, 0, 0, 0, 0, 0))]
    assert drain_all(first) == [
        row(B, "c", "cr", "a", "s"),
        row(B, "c", "cr", "a", "t"),
    ]
    assert drain_all(counters.swap()) == []


def test_swap_while_counting_loses_nothing(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=4)
    windows = []
    added = 0
    for i in range(20_000):
        counters.add(B + 60 * (i % 3), f"c{i % 7}", f"cr{i % 101}", "a", "", i % 6)
        added += 1
        if i % 997 == 0:
            windows.append(counters.swap())
    windows.append(counters.swap())
    rows = [r for window in windows for r in drain_all(window, 333)]
    assert sum(totals(rows)) == added
    assert [len(w) for w in windows] == [0] * len(windows)


def test_drain_from_another_thread_while_counting(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=8)
    handed_over: list[Any] = []
    drained: list[Row] = []
    more = threading.Condition()
    finished = False

    def flusher() -> None:
        while True:
            with more:
                more.wait_for(lambda: handed_over or finished)
                if not handed_over:
                    return
                window = handed_over.pop()
            while batch := window.drain(97):
                drained.extend(batch)

    thread = threading.Thread(target=flusher)
    thread.start()
    expected: Counter[tuple[int, str, str, str, str, int]] = Counter()
    try:
        for i in range(60_000):
            key = (B, f"c{i % 5}", f"cr{i % 1009}", f"a{i % 13}", "", i % 6)
            counters.add(*key)
            expected[key] += 1
            if i % 5_000 == 4_999:
                with more:
                    handed_over.append(counters.swap())
                    more.notify()
    finally:
        with more:
            handed_over.append(counters.swap())
            finished = True
            more.notify()
        thread.join(timeout=60)
    assert not thread.is_alive()
    got: Counter[tuple[int, str, str, str, str, int]] = Counter()
    for r in drained:
        for field, value in enumerate(r[5:]):
            if value:
                got[(*r[:5], field)] += value
    assert got == expected


def test_chunked_drain(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=4)
    keys = [(B, f"c{i}", "cr", "a", "s") for i in range(1_000)]
    for key in keys:
        counters.add(*key, 0)
    window = counters.swap()
    seen: list[Row] = []
    for left in range(1_000, 0, -7):
        assert len(window) == left
        batch = window.drain(7)
        assert len(batch) == min(7, left)
        seen.extend(batch)
    assert window.drain(7) == []
    assert window.drain(1) == []
    assert len(window) == 0
    # Each exactly once, in key order: "c0" < "c1" < "c10" < "c100" < "c101" ...
    assert [r[:5] for r in seen] == sorted(keys)
    assert [r[1] for r in seen[:5]] == ["c0", "c1", "c10", "c100", "c101"]


def test_drain_one_bigger_than_the_window(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "c", "", "", "", 0)
    window = counters.swap()
    assert len(window.drain(10**9)) == 1
    assert window.drain(10**9) == []


def test_drain_keeps_rows_through_memory_errors(counters_impl: ModuleType) -> None:
    # _testcapi (CPython's own test module) is the one way to make Python's
    # allocator fail on demand: the n-th allocation from now on, or only it.
    testcapi = pytest.importorskip("_testcapi")
    counters = counters_impl.Counters(shards=4)
    for i in range(2_000):
        counters.add(B, f"c{i}", "", "", "", 0, i + 1)
    window = counters.swap()
    drained: list[Row] = []
    failures = 0
    for start in range(300):
        testcapi.set_nomemory(start, start + 1 if start % 2 else 0)
        try:
            batch = window.drain(5)
        except MemoryError:
            failures += 1
            continue
        finally:
            testcapi.remove_mem_hooks()
        drained.extend(batch)
        assert len(window) + len(drained) == 2_000
    assert failures > 0
    drained.extend(drain_all(window))
    # Every row once, still in key order: a failed drain hands the same rows out again.
    assert [r[1] for r in drained] == sorted(f"c{i}" for i in range(2_000))
    assert sorted(r[5] for r in drained) == list(range(1, 2_001))


def test_a_drain_that_runs_out_of_memory_leaves_the_window_unlocked(
    counters_impl: ModuleType,
) -> None:
    # Each allocation in turn fails, with the free lists emptied first (a full collection
    # does), so that even a small tuple has to come from the allocator. The next drain runs
    # in a thread of its own: were the failed drain to leave the window's lock held, it would
    # wait for it forever, and the join says so instead.
    testcapi = pytest.importorskip("_testcapi")
    failed_at = []
    for nth in range(200):
        counters = counters_impl.Counters(shards=4)
        for i in range(50):
            counters.add(B, f"c{i}", "", "", "", 0, i + 1)
        window = counters.swap()
        gc.collect()
        testcapi.set_nomemory(nth, nth + 1)
        try:
            drained = len(window.drain(5))
        except MemoryError:
            drained = 0
            failed_at.append(nth)
        finally:
            testcapi.remove_mem_hooks()
        rows: list[list[Row]] = []
        drainer = threading.Thread(
            target=lambda rows, window: rows.append(drain_all(window)),
            args=(rows, window),
            daemon=True,
        )
        drainer.start()
        drainer.join(10)
        assert not drainer.is_alive(), f"a drain failing at allocation {nth} left the lock held"
        assert len(rows[0]) == 50 - drained
    assert failed_at


def test_growth_past_many_resizes(counters_impl: ModuleType) -> None:
    for shards in (1, 16):
        counters = counters_impl.Counters(shards=shards)
        n = 100_000
        for i in range(n):
            counters.add(B + i % 4, f"c{i % 10}", f"cr{i}", f"a{i % 1000}", "", i % 6, i % 7 + 1)
        for i in range(0, n, 3):  # existing keys are found again after the resizes
            counters.add(B + i % 4, f"c{i % 10}", f"cr{i}", f"a{i % 1000}", "", i % 6)
        assert len(counters) == n
        rows = drain_all(counters.swap(), 4096)
        assert len(rows) == n
        assert [r[:5] for r in rows] == sorted(r[:5] for r in rows)
        for r in rows:
            i = int(r[2][2:])
            counts = [0] * 6
            counts[i % 6] = i % 7 + 1 + (i % 3 == 0)
            assert r == row(
                B + i % 4, f"c{i % 10}", f"cr{i}", f"a{i % 1000}", "", counts=tuple(counts)
            )


def test_keys_of_every_size(counters_impl: ModuleType) -> None:
    # The compiled engine packs entries into 1 MiB slabs: many small keys fill
    # several; a key over 64 KiB that does not fit gets a slab of its own, even
    # one over 1 MiB; the small keys after it go on filling the slab they were in.
    large = [60_000, 65_000, 70_000, 1_100_000, 2_000_000, 300_000, 65_400]
    keys = []
    for i in range(30_000):
        size = large[i // 4_000] if i % 4_000 == 3_999 else i % 300
        keys.append((B + 60 * (i % 2), f"c{i % 7}", "é" * (size // 2), f"a{i}", "x" * (size % 2)))
    counters = counters_impl.Counters(shards=4)
    for i, key in enumerate(keys):
        counters.add(*key, i % 6, i + 1)
    window = counters.swap()
    expected = sorted(
        row(*key, counts=tuple((i + 1) * (f == i % 6) for f in range(6)))
        for i, key in enumerate(keys)
    )
    assert copy_rows(drain_copy_all(window, 999)) == expected


# -------------------------------------------------------------------- memory


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_memory_comes_back(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=4)
    drained = []

    def fill() -> None:  # 10 MB of keys in the compiled engine
        for i in range(5_000):
            counters.add(B, f"c{i}", "x" * 2_000, "", "", 0)

    def dropped_whole() -> None:
        fill()
        counters.swap()

    def dropped_half_drained() -> None:
        fill()
        counters.swap().drain_copy(2_500)

    def drained_but_kept() -> None:
        fill()
        window = counters.swap()
        drain_copy_all(window, 999)
        drained.append(window)  # its memory went with its last row

    def init_again() -> None:
        fill()
        counters.__init__(shards=4)  # the keys counted so far are dropped

    for case in (dropped_whole, dropped_half_drained, drained_but_kept, init_again):
        case()
        before = resident_bytes()
        for _ in range(5):
            case()
        # Keeping the keys would take 5 x 10 MB.
        assert resident_bytes() - before < 25_000_000, case.__name__
    assert len(drained) == 6


def test_init_again_starts_over(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(max_keys=10, shards=2)
    counters.add(B, "a", "", "", "", 0)
    window = counters.swap()
    for i in range(20):
        counters.add(B, f"b{i}", "", "", "", 0)
    assert (len(counters), counters.overflowed) == (11, 10)
    with pytest.raises(ValueError):
        counters.__init__(shards=3)
    assert (len(counters), counters.overflowed, counters.max_keys) == (11, 10, 10)
    counters.__init__(max_keys=2, shards=1)
    assert (len(counters), counters.overflowed, counters.max_keys) == (0, 0, 2)
    for i in range(3):
        counters.add(B, "c", "", "", "", 0)
        counters.add(B, f"d{i}", "", "", "", 1)
    assert drain_all(counters.swap()) == [
        row(B, "__overflow__", "", "", "", counts=(0, 2, 0, 0, 0, 0)),
        row(B, "c", "", "", "", counts=(3, 0, 0, 0, 0, 0)),
        row(B, "d0", "", "", "", counts=(0, 1, 0, 0, 0, 0)),
    ]
    # A window swapped out before keeps its rows.
    assert drain_all(window) == [row(B, "a", "", "", "")]


# Run in a process of its own: the limit on the address space is the process's.
OUT_OF_MEMORY = """
import importlib, resource, sys
from tests.harness import copy_rows

engine = importlib.import_module(sys.argv[1])
B = 1_700_000_000
PAD = "x" * 3_000

def limited(headroom, action):
    # Whether action() ran out of memory, with headroom bytes of address space to grow into.
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        action()
    except MemoryError:
        return True
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return False

counters = engine.Counters(max_keys=10**9, shards=4)

def add(i):
    counters.add(B, f"{i:07d}{PAD}", "", "", "", 0, i + 1)

def count_until_out_of_memory():
    while True:
        add(len(counters))

for _ in range(3):  # out of memory while counting, then on again
    assert limited(32 << 20, count_until_out_of_memory)
    for _ in range(100):
        add(len(counters))
keys = len(counters)
window = counters.swap()
limited(0, lambda: window.totals)  # the compiled engine runs out as it sorts
limited(0, lambda: window.drain_copy(10**9))
assert window.totals == (keys * (keys + 1) // 2, 0, 0, 0, 0, 0)
rows = []
while chunk := window.drain_copy(1_000):
    rows += copy_rows(chunk)
assert rows == [(B, f"{i:07d}{PAD}", "", "", "", i + 1, 0, 0, 0, 0, 0) for i in range(keys)]
print(keys)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_out_of_memory_while_counting_and_sorting(counters_impl: ModuleType) -> None:
    resource = pytest.importorskip("resource")
    if resource.getrlimit(resource.RLIMIT_AS)[1] != resource.RLIM_INFINITY:
        pytest.skip("the address space has a hard limit already")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(OUT_OF_MEMORY), counters_impl.__name__],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 20_000  # 32 MB three times, 3 KB a key


# ------------------------------------------------- key order, COPY, totals

# PostgreSQL's order for the primary key with COLLATE "C": bucket as a signed
# integer, then each dimension as UTF-8 bytes, a prefix first.
KEYS_IN_ORDER = [
    (FIRST_BUCKET, "z", "", "", ""),
    (-60, "a", "", "", ""),
    (0, "", "", "", ""),
    (0, "", "", "", "a"),
    (0, "", "", "a", ""),
    (0, "", "a", "", ""),
    (0, "A", "", "", ""),  # "A" (41) < "a" (61)
    (0, "a", "", "", ""),
    (0, "a", "", "", "b"),
    (0, "a", "b", "", ""),
    (0, "a\x00", "", "", ""),
    (0, "ab", "", "", ""),
    (0, "b", "", "", ""),
    (0, "z", "", "", ""),
    (0, "é", "", "", ""),  # C3 A9, after "z" (7A)
    (0, "é", "a", "", ""),
    (0, "éa", "", "", ""),
    (0, "\ue000", "", "", ""),  # EE 80 80: before U+1F600, unlike in UTF-16
    (0, "😀", "", "", ""),  # F0 9F 98 80
    (B, "a", "", "", ""),
    (B + 60, "", "", "", ""),
    (LAST_BUCKET, "", "", "", ""),
]


@pytest.mark.parametrize("shards", [1, 16])
def test_drain_in_key_order(counters_impl: ModuleType, shards: int) -> None:
    counters = counters_impl.Counters(shards=shards)
    added = list(enumerate(KEYS_IN_ORDER))
    random.Random(7).shuffle(added)
    for i, key in added:
        counters.add(*key, 0, i + 1)
    window = counters.swap()
    expected = [row(*key, counts=(i + 1, 0, 0, 0, 0, 0)) for i, key in enumerate(KEYS_IN_ORDER)]
    assert drain_all(window, 3) == expected
    counters = counters_impl.Counters(shards=shards)
    for i, key in added:
        counters.add(*key, 0, i + 1)
    assert copy_rows(drain_copy_all(counters.swap(), 5)) == expected


# Keys that share a prefix of up to 40 bytes of UTF-8 and then differ, at any byte of
# the next 8 or 16, in one dimension or across two, by a NUL, an ASCII or a multibyte
# character, or by where a dimension ends.
SHARED_PREFIXES = ["", "p" * 7, "p" * 8, "p" * 9, "p" * 15, "p" * 16, "p" * 17, "é" * 12, "p" * 40]
ENDINGS = ["", "\x00", "\x00a", "a", "ab", "\x7f", "é", "😀"]


def test_order_decided_past_shared_prefixes(counters_impl: ModuleType) -> None:
    keys = sorted(
        {
            key
            for bucket in (-1, B)
            for prefix in SHARED_PREFIXES
            for a in ENDINGS
            for b in ENDINGS
            for c in ENDINGS
            for key in ((bucket, prefix + a, b, c, ""), (bucket, "", a, prefix + b, prefix + c))
        }
    )
    added = random.Random(11).sample(keys, len(keys))
    counters = counters_impl.Counters(shards=4)
    for key in added:
        counters.add(*key, 0)
    assert drain_all(counters.swap(), 1_000) == [row(*key) for key in keys]


def test_order_of_keys_sharing_ever_longer_prefixes(counters_impl: ModuleType) -> None:
    # Each 8 more bytes shared split one group of keys off the rest: the
    # compiled sort goes deeper than it recurses, and ends with comparisons.
    keys = [
        key
        for j in range(40)
        for i in range(40)
        for key in ((B, "a" * 8 * j + f"b{i}", "", "", ""), (B, "a" * 8 * j, f"b{i}", "", ""))
    ]
    random.Random(12).shuffle(keys)
    counters = counters_impl.Counters(shards=2)
    for key in keys:
        counters.add(*key, 0)
    assert drain_all(counters.swap(), 500) == [row(*key) for key in sorted(keys)]


def copy_field(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def copy_tuple(bucket: int, *dims: str, counts: tuple[int, ...]) -> bytes:
    fields = [struct.pack(">q", (bucket - POSTGRES_EPOCH) * 1_000_000), *(d.encode() for d in dims)]
    fields += [struct.pack(">q", count) for count in counts]
    return struct.pack(">h", 11) + b"".join(copy_field(f) for f in fields)


def test_drain_copy_bytes(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    counters.add(B + 60, "c", "cr", "a", "s", counters_impl.IMPRESSIONS, 3)
    counters.add(B, "é", "", "x", "", counters_impl.CLICKS, 2**63 - 1)
    counters.add(B, "é", "", "x", "", counters_impl.GIVT_IMPRESSIONS)
    counters.add(-1, "", "", "", "", counters_impl.VIEWABLE)
    window = counters.swap()
    int8_0 = b"\x00\x00\x00\x08" + b"\x00" * 8
    first = (
        b"\x00\x0b"  # 11 fields
        + b"\x00\x00\x00\x08" + struct.pack(">q", -946_684_801_000_000)  # bucket -1
        + b"\x00\x00\x00\x00" * 4  # four empty texts: length 0, not NULL (-1)
        + int8_0 * 3
        + b"\x00\x00\x00\x08" + b"\x00" * 7 + b"\x01"  # viewable 1
        + int8_0 * 2
    )  # fmt: skip
    assert first == copy_tuple(-1, "", "", "", "", counts=(0, 0, 0, 1, 0, 0))
    second = copy_tuple(B, "é", "", "x", "", counts=(0, 1, 0, 0, 2**63 - 1, 0))
    micros = (B - POSTGRES_EPOCH) * 1_000_000
    assert second[2:18] == b"\x00\x00\x00\x08" + micros.to_bytes(8, "big") + b"\x00\x00\x00\x02"
    assert second[18:20] == b"\xc3\xa9"
    third = copy_tuple(B + 60, "c", "cr", "a", "s", counts=(3, 0, 0, 0, 0, 0))
    assert window.drain_copy(2) == first + second
    assert len(window) == 1
    assert window.drain_copy(2) == third
    assert window.drain_copy(2) == b""
    assert len(window) == 0


def test_a_dimension_longer_than_a_copy_field_is_refused(counters_impl: ModuleType) -> None:
    # COPY writes each field's length as an int32: a longer dimension would encode a negative
    # length, and the batch holding it could not be sealed.
    counters = counters_impl.Counters()
    too_long = "a" * 2**31
    with pytest.raises(ValueError, match=r"longer than 2\*\*31 - 1 bytes"):
        counters.add(0, "c", "", too_long, "", 0)
    del too_long
    assert len(counters) == 0


def test_buckets_past_timestamptz_are_refused(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    for bucket in (FIRST_BUCKET - 1, LAST_BUCKET + 1, 2**63 - 1, -(2**63)):
        with pytest.raises(ValueError, match="past what PostgreSQL's timestamptz holds"):
            counters.add(bucket, "c", "", "", "", 0)
        with pytest.raises(ValueError, match="past what PostgreSQL's timestamptz holds"):
            counters.add_query(bucket, b"cid=c", 0, 5, 0, 128)
    assert len(counters) == 0
    for bucket in (LAST_BUCKET, FIRST_BUCKET):
        counters.add(bucket, "c", "", "", "", 0)
    copy = counters.swap().drain_copy(10)
    starts = (0, len(copy) // 2)
    assert [struct.unpack_from(">q", copy, at + 6)[0] for at in starts] == [
        (FIRST_BUCKET - POSTGRES_EPOCH) * 1_000_000,
        (LAST_BUCKET - POSTGRES_EPOCH) * 1_000_000,
    ]


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTCOUNT_NO_EXTENSIONS is set")
def test_drain_copy_same_bytes_from_both_engines() -> None:
    c_module = importlib.import_module("_fastcount._counters_c")
    py_module = _fastcount._counters_py
    rng = random.Random(20240611)
    buckets = [FIRST_BUCKET, -60, 0, 60, B, B + 60, B + 120, LAST_BUCKET]
    words = ["", "", "a", "ab", "b", "A", "é", "été", "バナー", "😀", "\x00", "\ue000", "z" * 70]
    adds = []
    for _ in range(20_000):
        dims = [rng.choice(words) + rng.choice(["", "", str(rng.randrange(60))]) for _ in range(4)]
        adds.append((rng.choice(buckets), *dims, rng.randrange(6), rng.choice([1, 2, 2**40])))
    windows = []
    for module in (c_module, py_module):
        counters = module.Counters(max_keys=5_000, shards=8)  # past it: overflow rows
        for add in adds:
            counters.add(*add)
        assert counters.overflowed > 0
        windows.append(counters.swap())
    c_window, py_window = windows
    assert c_window.totals == py_window.totals
    limits = [rng.choice([1, 7, 100, 1_000]) for _ in range(200)]
    c_copy = b"".join(c_window.drain_copy(limit) for limit in limits)
    py_copy = b"".join(py_window.drain_copy(limit) for limit in limits)
    assert len(c_window) == len(py_window) == 0
    assert c_copy == py_copy
    rows = copy_rows(c_copy)
    assert [r[:5] for r in rows] == sorted({r[:5] for r in rows})  # in key order, each once
    assert totals(rows) == list(c_window.totals)
    assert sum(r[1] == c_module.OVERFLOW_CAMPAIGN for r in rows) > 1


def test_last_copy_tuple(counters_impl: ModuleType) -> None:
    for keys in (1, 2, 37):
        counters = counters_impl.Counters()
        for n in range(keys):
            counters.add(B, f"c{n:03}", "é" * n, "", "", 0)
        window = counters.swap()
        head = window.drain_copy(keys - 1) if keys > 1 else b""
        tuples = head + window.drain_copy(1)
        assert counters_impl.last_copy_tuple(tuples) == len(head)
    trailer = struct.pack(">h", -1)  # a COPY file's end, inside the tuples
    fewer = struct.pack(">h", 10) + tuples[2:]  # a field count that is not pixel_counts'
    first_length = struct.calcsize(">hi")
    null = tuples[:2] + struct.pack(">i", -1) + tuples[first_length + 8 :]  # a NULL bucket
    for broken in (
        b"",
        tuples[:-1],
        tuples + b"\x00",
        tuples[:1],
        trailer + tuples,
        head + trailer,
        fewer,
        null,
        struct.pack(">hi", 1, -1),
    ):
        with pytest.raises(ValueError, match="not binary COPY tuples of pixel_counts"):
            counters_impl.last_copy_tuple(broken)
    with pytest.raises(TypeError):
        counters_impl.last_copy_tuple(bytearray(tuples))


def test_drain_and_drain_copy_take_turns(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=4)
    for i in range(100):
        counters.add(B + 60 * (i % 3), f"c{i:02d}", "cr", "é", "", i % 6, i + 1)
    window = counters.swap()
    expected = sorted(
        row(
            B + 60 * (i % 3),
            f"c{i:02d}",
            "cr",
            "é",
            "",
            counts=tuple((i + 1) * (f == i % 6) for f in range(6)),
        )
        for i in range(100)
    )
    got: list[Row] = []
    for step in range(40):
        if step % 2:
            got += copy_rows(window.drain_copy(3))
        else:
            got += window.drain(2)
        assert len(window) == 100 - len(got)
    got += copy_rows(window.drain_copy(10**9))
    assert window.drain(1) == []
    assert got == expected


def test_totals(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    big = 2**63 - 1
    for i in range(5):
        counters.add(B, f"c{i}", "", "", "", counters_impl.IMPRESSIONS, big)
        counters.add(B, f"c{i}", "", "", "", counters_impl.GIVT_CLICKS, big - i)
        counters.add(B + 60, f"c{i}", "", "", "", counters_impl.CLICKS, i + 1)
    window = counters.swap()
    expected = (5 * big, 0, 0, 0, 15, 5 * big - 10)
    assert expected[0] > 2**64  # past int64, and past a uint64 too
    assert window.totals == expected
    assert all(type(total) is int for total in window.totals)
    window.drain(3)
    assert window.totals == expected  # drained or not
    window.drain_copy(4)
    assert window.totals == expected
    assert drain_all(window)[-1] == row(B + 60, "c4", "", "", "", counts=(0, 0, 0, 0, 5, 0))
    assert window.totals == expected
    assert counters.swap().totals == (0, 0, 0, 0, 0, 0)


def test_totals_first_then_drain(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(shards=2)
    for i in range(3_000):
        counters.add(B, f"c{i % 700}", "", "", "", i % 6, i + 1)
    window = counters.swap()
    expected = window.totals
    rows = drain_all(window, 101)
    assert list(expected) == totals(rows)
    assert len(rows) == 700
    assert [r[1] for r in rows] == sorted(f"c{i}" for i in range(700))


@pytest.mark.parametrize("method", ["drain", "drain_copy"])
def test_threads_drain_disjoint_rows(counters_impl: ModuleType, method: str) -> None:
    counters = counters_impl.Counters(shards=8)
    n = 30_000
    for i in range(n):
        counters.add(B + 60 * (i % 2), f"c{i % 11}", f"cr{i}", "é", "", i % 6, i + 1)
    window = counters.swap()
    start = threading.Barrier(4)
    chunks: list[list[list[Row]]] = [[] for _ in range(4)]

    def take() -> list[Row]:
        if method == "drain":
            return list(window.drain(97))
        return copy_rows(window.drain_copy(97))

    def drain(own: list[list[Row]]) -> None:
        start.wait()
        while chunk := take():
            own.append(chunk)

    threads = [threading.Thread(target=drain, args=(own,)) for own in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(window) == 0
    everything = [r for own in chunks for chunk in own for r in chunk]
    assert len(everything) == n
    assert sorted(r[2] for r in everything) == sorted(f"cr{i}" for i in range(n))
    for own in chunks:
        for chunk in own:  # each batch is a run of the key order
            assert [r[:5] for r in chunk] == sorted(r[:5] for r in chunk)
    # The batches, put back in the order they were taken in, are the key order.
    batches = sorted((chunk for own in chunks for chunk in own), key=lambda chunk: chunk[0][:5])
    assert [r for chunk in batches for r in chunk] == sorted(everything)


# ------------------------------------------------------------------ key cap


def test_key_cap_sends_new_keys_to_the_overflow_row(counters_impl: ModuleType) -> None:
    overflow = counters_impl.OVERFLOW_CAMPAIGN
    counters = counters_impl.Counters(max_keys=3)
    assert counters.max_keys == 3
    for i in range(3):
        counters.add(B, f"c{i}", "", "", "", 0)
    assert (len(counters), counters.overflowed) == (3, 0)
    counters.add(B, "c0", "", "", "", 0, 4)  # existing keys still count
    counters.add(B, "new1", "", "", "", 3, 2)
    counters.add(B, "new2", "", "", "", 3)
    counters.add(B + 60, "new3", "", "", "", 4, 5)  # one overflow row per bucket
    assert (len(counters), counters.overflowed) == (5, 8)
    window = counters.swap()
    assert (len(window), window.overflowed) == (5, 8)
    assert (len(counters), counters.overflowed) == (0, 0)
    assert drain_all(window) == [
        row(B, overflow, "", "", "", counts=(0, 0, 0, 3, 0, 0)),  # "_" (5F) < "c" (63)
        row(B, "c0", "", "", "", counts=(5, 0, 0, 0, 0, 0)),
        row(B, "c1", "", "", ""),
        row(B, "c2", "", "", ""),
        row(B + 60, overflow, "", "", "", counts=(0, 0, 0, 0, 5, 0)),
    ]
    assert window.overflowed == 8
    counters.add(B, "new1", "", "", "", 0)  # a fresh window has room again
    assert (len(counters), counters.overflowed) == (1, 0)


def test_key_cap_totals(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(max_keys=100, shards=2)
    added = [0] * 6
    for i in range(5_000):
        counters.add(B + 60 * (i % 2), f"c{i % 250}", "cr", "a", "s", i % 6, i % 3 + 1)
        added[i % 6] += i % 3 + 1
    overflowed = counters.overflowed
    window = counters.swap()
    rows = drain_all(window)
    assert totals(rows) == added == list(window.totals)
    overflow_rows = [r for r in rows if r[1] == counters_impl.OVERFLOW_CAMPAIGN]
    assert len(rows) - len(overflow_rows) == 100
    assert len(overflow_rows) == 2
    assert sum(totals(overflow_rows)) == overflowed == window.overflowed > 0


def test_overflow_rows_do_not_count_toward_the_cap(counters_impl: ModuleType) -> None:
    overflow = counters_impl.OVERFLOW_CAMPAIGN
    counters = counters_impl.Counters(max_keys=1)
    counters.add(B, overflow, "", "", "", 0)  # counted into directly: no redirect
    counters.add(B, "c", "", "", "", 0)
    counters.add(B + 60, overflow, "", "", "", 0)
    assert (len(counters), counters.overflowed) == (3, 0)
    counters.add(B, "d", "", "", "", 0)
    assert (len(counters), counters.overflowed) == (3, 1)
    counters.add(B + 120, "d", "", "", "", 0)
    assert (len(counters), counters.overflowed) == (4, 2)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_keys": 0}, ValueError),
        ({"max_keys": -1}, ValueError),
        ({"max_keys": 2**63}, OverflowError),
        ({"max_keys": 1.0}, TypeError),
        ({"shards": 0}, ValueError),
        ({"shards": 3}, ValueError),
        ({"shards": -16}, ValueError),
        ({"shards": 1 << 17}, ValueError),
        ({"shards": "16"}, TypeError),
    ],
)
def test_constructor_errors(
    counters_impl: ModuleType, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        counters_impl.Counters(**kwargs)


def test_constructor_accepts_bounds(counters_impl: ModuleType) -> None:
    assert counters_impl.Counters(max_keys=1, shards=1).max_keys == 1
    assert counters_impl.Counters(max_keys=2**63 - 1, shards=1 << 16).max_keys == 2**63 - 1


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((B, None, "", "", "", 0), TypeError),
        ((B, "", b"x", "", "", 0), TypeError),
        ((B, "", "", 1, "", 0), TypeError),
        ((B, "", "", "", type("S", (str,), {})("x"), 0), TypeError),  # exact str only
        (("1", "", "", "", "", 0), TypeError),
        ((1.0, "", "", "", "", 0), TypeError),
        ((B, "", "", "", "", 0.0), TypeError),
        ((B, "", "", "", "", 0, 1.0), TypeError),
        ((2**63, "", "", "", "", 0), OverflowError),
        ((B, "", "", "", "", 2**64), OverflowError),
        ((B, "", "", "", "", -1), ValueError),
        ((B, "", "", "", "", 6), ValueError),
        ((B, "", "", "", "", 0, 0), ValueError),
        ((B, "", "", "", "", 0, -1), ValueError),
        ((B, "\udc80", "", "", "", 0), UnicodeEncodeError),  # lone surrogate
        ((LAST_BUCKET + 1, "", "", "", "", 0), ValueError),
        ((LAST_BUCKET + 1, "\udc80", "", "", "", 0), UnicodeEncodeError),  # then the bucket
        ((B, None, "", "", "", 6), TypeError),  # type errors come first
        ((2**63, "", "", "", "", 6), OverflowError),  # then the integers' ranges
    ],
)
def test_add_errors(
    counters_impl: ModuleType, args: tuple[Any, ...], error: type[Exception]
) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "", "", "", "", 0)
    with pytest.raises(error):
        counters.add(*args)
    with pytest.raises(error):  # also when the key is already there
        counters.add(*args)
    assert len(counters) == 1
    assert drain_all(counters.swap()) == [row(B, "", "", "", "")]


def test_add_accepts_index_integers(counters_impl: ModuleType) -> None:
    class Index:
        def __index__(self) -> int:
            return 2

    counters = counters_impl.Counters()
    counters.add(True, "", "", "", "", Index(), Index())
    assert drain_all(counters.swap()) == [row(1, "", "", "", "", counts=(0, 0, 2, 0, 0, 0))]


def test_full_window_still_refuses_bad_arguments(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters(max_keys=1)
    counters.add(B, "a", "", "", "", 0)
    with pytest.raises(UnicodeEncodeError):
        counters.add(B, "\udc80", "", "", "", 0)
    with pytest.raises(OverflowError):
        counters.add(2**63, "b", "", "", "", 0)
    with pytest.raises(ValueError, match="timestamptz"):
        counters.add(LAST_BUCKET + 1, "b", "", "", "", 0)
    assert counters.overflowed == 0


@pytest.mark.parametrize("method", ["drain", "drain_copy"])
@pytest.mark.parametrize(
    ("limit", "error"),
    [(0, ValueError), (-1, ValueError), (1.0, TypeError), ("1", TypeError), (2**63, OverflowError)],
)
def test_drain_errors(
    counters_impl: ModuleType, method: str, limit: Any, error: type[Exception]
) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "", "", "", "", 0)
    window = counters.swap()
    with pytest.raises(error):
        getattr(window, method)(limit)
    assert len(window) == 1
    assert drain_all(window) == [row(B, "", "", "", "")]


def test_windows_come_only_from_swap(counters_impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        counters_impl.Window()


def test_read_only_and_final(counters_impl: ModuleType) -> None:
    counters = counters_impl.Counters()
    window = counters.swap()
    with pytest.raises(AttributeError):
        counters.overflowed = 1
    with pytest.raises(AttributeError):
        counters.max_keys = 1
    with pytest.raises(AttributeError):
        window.overflowed = 1
    with pytest.raises(AttributeError):
        window.totals = (0, 0, 0, 0, 0, 0)
    with pytest.raises(AttributeError):
        counters.anything = 1
    for cls in (counters_impl.Counters, counters_impl.Window):
        with pytest.raises(TypeError):
            type("Sub", (cls,), {})
