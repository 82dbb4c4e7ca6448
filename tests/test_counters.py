"""The counter engine: every case runs against the compiled and the pure-Python module."""

import doctest
import importlib
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import _fastcount
import _fastcount._counters_py

Row = tuple[int, str, str, str, str, int, int, int, int, int, int]

NO_EXTENSIONS = bool(os.environ.get("FASTCOUNT_NO_EXTENSIONS"))
PUBLIC_NAMES = {
    "CLICKS",
    "COLUMNS",
    "Counters",
    "GIVT_CLICKS",
    "GIVT_IMPRESSIONS",
    "IMPRESSIONS",
    "MEASURABLE",
    "OVERFLOW_CAMPAIGN",
    "VIEWABLE",
    "Window",
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
    assert set(counters_impl.__all__) == PUBLIC_NAMES == set(_fastcount.__all__)
    py = _fastcount._counters_py
    for name in PUBLIC_NAMES - {"Counters", "Window"}:
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
    buckets = [0, 60, B, B + 60, -60, 2**63 - 1, -(2**63)]
    for i, bucket in enumerate(buckets):
        for _ in range(i + 1):
            counters.add(bucket, "c", "cr", "a", "s", 0)
    assert len(counters) == len(buckets)
    assert sorted(drain_all(counters.swap())) == sorted(
        row(bucket, "c", "cr", "a", "s", counts=(i + 1, 0, 0, 0, 0, 0))
        for i, bucket in enumerate(buckets)
    )


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
    expected = [row(B, *key, counts=(0, 0, 0, 0, i + 1, 0)) for i, key in enumerate(keys)]
    assert sorted(drain_all(counters.swap())) == sorted(expected)


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
    assert sorted(drain_all(counters.swap())) == sorted(
        row(B, *key, counts=(i + 1, 0, 0, 0, 0, 0)) for i, key in enumerate(keys)
    )


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
    assert sorted(drain_all(first)) == [
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
    assert sorted(r[:5] for r in seen) == sorted(keys)  # each exactly once


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
    assert sorted(r[5] for r in drained) == list(range(1, 2_001))


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
        for r in rows:
            i = int(r[2][2:])
            counts = [0] * 6
            counts[i % 6] = i % 7 + 1 + (i % 3 == 0)
            assert r == row(
                B + i % 4, f"c{i % 10}", f"cr{i}", f"a{i % 1000}", "", counts=tuple(counts)
            )


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
    assert sorted(drain_all(window)) == sorted(
        [
            row(B, "c0", "", "", "", counts=(5, 0, 0, 0, 0, 0)),
            row(B, "c1", "", "", ""),
            row(B, "c2", "", "", ""),
            row(B, overflow, "", "", "", counts=(0, 0, 0, 3, 0, 0)),
            row(B + 60, overflow, "", "", "", counts=(0, 0, 0, 0, 5, 0)),
        ]
    )
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
    assert totals(rows) == added
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
    assert counters.overflowed == 0


@pytest.mark.parametrize(("limit", "error"), [(0, ValueError), (-1, ValueError), (1.0, TypeError)])
def test_drain_errors(counters_impl: ModuleType, limit: Any, error: type[Exception]) -> None:
    counters = counters_impl.Counters()
    counters.add(B, "", "", "", "", 0)
    window = counters.swap()
    with pytest.raises(error):
        window.drain(limit)
    assert len(window) == 1


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
        counters.anything = 1
    for cls in (counters_impl.Counters, counters_impl.Window):
        with pytest.raises(TypeError):
            type("Sub", (cls,), {})
