"""Counter engines against the idiomatic dict of tuples, on the same keys.

    python loadtests/bench_counters.py --keys 100000 --increments 1000000 --repeat 5

Prints, for the compiled engine, the pure-Python twin and the baseline
``d[(bucket, campaign, creative, affiliate, sub_id)][field] += 1``, the median
increments per second and bytes per key, and their ratios to the baseline.

The keys follow a skewed mix: a few campaigns, each with many creatives, a long
tail of affiliates and sub ids (many empty), two minute buckets; increments hit
every key at least once, then mostly the popular ones (Zipf).

Speed is measured twice: with shared strings (one str object per distinct
dimension value, its hash cached after first use, as if interned) and with
fresh strings (a new str object per increment, as the server gets from each
query string). Each run drives the engine from a Python loop, as the server
does; the cost of that loop alone (iterating and unpacking the increments) is
printed too, and the "net" ratio leaves it out of both sides.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence, Sized
from itertools import accumulate
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from _fastcount import _counters_py
from server.config import positive_int
from server.metrics import resident_bytes

Spec = tuple[int, int, int, int, int]  # bucket, campaign, creative, affiliate, sub id numbers
Op = tuple[int, str, str, str, str, int]
BUCKET = 1_700_000_040
FIELD_WEIGHTS = (50, 5, 20, 15, 8, 2)  # impressions, givt, measurable, viewable, clicks, givt


def zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(accumulate(1.0 / (rank + 1) ** s for rank in range(n)))


def make_specs(keys: int, rng: random.Random) -> list[Spec]:
    campaigns = zipf_cum_weights(25, 1.0)
    creatives = zipf_cum_weights(400, 0.8)
    affiliates = zipf_cum_weights(50_000, 1.1)
    seen: set[Spec] = set()
    specs: list[Spec] = []
    while len(specs) < keys:
        spec = (
            BUCKET + 60 * (rng.random() < 0.3),
            rng.choices(range(25), cum_weights=campaigns)[0],
            rng.choices(range(400), cum_weights=creatives)[0],
            rng.choices(range(50_000), cum_weights=affiliates)[0],
            0 if rng.random() < 0.4 else rng.randrange(1, 2**40),
        )
        if spec not in seen:
            seen.add(spec)
            specs.append(spec)
    return specs


def key_of(spec: Spec) -> tuple[int, str, str, str, str]:
    """A key with new str objects, as parsing a query string makes them."""
    bucket, campaign, creative, affiliate, sub_id = spec
    return (
        bucket,
        f"cmp-{campaign:04d}",
        f"cr-{campaign:04d}-{creative:05d}-300x250",
        f"aff-{affiliate:06d}" if affiliate % 50 else f"partenaire-é{affiliate}",
        f"{sub_id:010x}" if sub_id else "",
    )


def make_stream(specs: list[Spec], increments: int, rng: random.Random) -> list[tuple[int, int]]:
    """(key index, field) per increment: every key once, then Zipf-popular keys."""
    n = len(specs)
    hits = list(range(n))
    hits += rng.choices(range(n), cum_weights=zipf_cum_weights(n, 0.9), k=max(increments - n, 0))
    rng.shuffle(hits)
    fields = rng.choices(range(6), weights=FIELD_WEIGHTS, k=len(hits))
    return list(zip(hits, fields, strict=True))


def ops_shared(
    keys: list[tuple[int, str, str, str, str]], stream: list[tuple[int, int]]
) -> list[Op]:
    return [(*keys[i], field) for i, field in stream]


def ops_fresh(specs: list[Spec], stream: list[tuple[int, int]]) -> list[Op]:
    return [(*key_of(specs[i]), field) for i, field in stream]


# ------------------------------------------------------------------ runners


def run_loop_only(ops: list[Op]) -> Sized:
    for _b, _c, _cr, _a, _s, _f in ops:
        pass
    return ()


def run_dict(ops: list[Op]) -> dict[tuple[int, str, str, str, str], list[int]]:
    rows: dict[tuple[int, str, str, str, str], list[int]] = {}
    get = rows.get
    for b, c, cr, a, s, f in ops:
        key = (b, c, cr, a, s)
        row = get(key)
        if row is None:
            row = rows[key] = [0, 0, 0, 0, 0, 0]
        row[f] += 1
    return rows


def engine_runner(module: ModuleType) -> Callable[[list[Op]], Sized]:
    def run(ops: list[Op]) -> Sized:
        counters = module.Counters(max_keys=10**9)
        add = counters.add
        for b, c, cr, a, s, f in ops:
            add(b, c, cr, a, s, f)
        return counters  # type: ignore[no-any-return]

    return run


def timed(run: Callable[[list[Op]], Sized], make_ops: Callable[[], list[Op]]) -> tuple[float, int]:
    """Seconds for one run, and the number of keys it counted."""
    ops = make_ops()
    # The increments themselves are not the engine's garbage to collect; what
    # the engine allocates stays under the collector, as in the server.
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    result = run(ops)
    elapsed = time.perf_counter() - start
    gc.unfreeze()
    keys = len(result)
    del result, ops
    gc.collect()
    return elapsed, keys


# ------------------------------------------------------------------- memory


def bytes_per_key_traced(build: Callable[[], object], keys: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / keys


def bytes_per_key_resident(build: Callable[[], object], keys: int) -> float:
    gc.collect()
    before = resident_bytes()
    kept = build()
    after = resident_bytes()
    del kept
    return (after - before) / keys


def fill_engine(module: ModuleType, keys: Sequence[Any]) -> object:
    counters = module.Counters(max_keys=10**9)
    for key in keys:
        counters.add(*key, 0)
    return counters


def fill_dict(keys: Sequence[Any]) -> object:
    rows: dict[tuple[int, str, str, str, str], list[int]] = {}
    for b, c, cr, a, s in keys:
        rows.setdefault((b, c, cr, a, s), [0, 0, 0, 0, 0, 0])[0] += 1
    return rows


class FreshKeys(Sequence[tuple[int, str, str, str, str]]):
    """Keys whose strings are made as they are read (and kept only by a dict)."""

    def __init__(self, specs: list[Spec]) -> None:
        self._specs = specs

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, i: Any) -> Any:
        return key_of(self._specs[i])


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keys", type=positive_int, default=100_000, help="distinct keys (default 100000)"
    )
    parser.add_argument(
        "--increments",
        type=positive_int,
        default=1_000_000,
        help="increments per run (default 1000000)",
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=5, help="runs per figure (default 5)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    try:
        from _fastcount import _counters_c
    except ImportError:
        print("compiled engine not built: python setup.py build_ext --inplace", file=sys.stderr)
        return 1

    rng = random.Random(args.seed)
    specs = make_specs(args.keys, rng)
    stream = make_stream(specs, args.increments, rng)
    shared_keys = [key_of(spec) for spec in specs]
    increments = len(stream)
    print(
        f"Python {sys.version.split()[0]}, {args.keys} keys, {increments} increments,"
        f" median of {args.repeat} runs; gc on (the increments list frozen out of it)."
    )

    runners: dict[str, Callable[[list[Op]], Sized]] = {
        "compiled (Cython)": engine_runner(_counters_c),
        "pure-python twin": engine_runner(_counters_py),
        "dict of tuples": run_dict,
    }
    modes: dict[str, Callable[[], list[Op]]] = {
        "shared strings": lambda: ops_shared(shared_keys, stream),
        "fresh strings": lambda: ops_fresh(specs, stream),
    }
    # Memory first, the compiled engine's before the rest: its figure is the growth of resident
    # memory, which a heap already grown by other runs would hide.
    figures: dict[str, float] = {}
    figures["compiled"] = bytes_per_key_resident(
        lambda: fill_engine(_counters_c, FreshKeys(specs)), args.keys
    )
    figures["dict, own key strings"] = bytes_per_key_traced(
        lambda: fill_dict(FreshKeys(specs)), args.keys
    )
    figures["dict, shared strings"] = bytes_per_key_traced(
        lambda: fill_dict(shared_keys), args.keys
    )
    figures["pure-python twin, own"] = bytes_per_key_traced(
        lambda: fill_engine(_counters_py, FreshKeys(specs)), args.keys
    )
    report: dict[str, float] = {}
    for mode, make_ops in modes.items():
        print(f"\nSpeed, {mode}:")
        loop = statistics.median(timed(run_loop_only, make_ops)[0] for _ in range(args.repeat))
        print(f"  {'loop alone':<20} {loop / increments * 1e9:7.1f} ns/increment")
        medians: dict[str, float] = {}
        for name, run in runners.items():
            runs = [timed(run, make_ops) for _ in range(args.repeat)]
            assert all(keys == args.keys for _, keys in runs), (name, runs[0][1])
            medians[name] = statistics.median(elapsed for elapsed, _ in runs)
        base = medians["dict of tuples"]
        print(
            f"  {'engine':<20} {'increments/s':>14} {'ns/incr':>8} {'net ns':>7}"
            f" {'vs dict':>8} {'net vs dict':>12}"
        )
        for name, elapsed in medians.items():
            ns = elapsed / increments * 1e9
            net = (elapsed - loop) / increments * 1e9
            net_base = (base - loop) / increments * 1e9
            report[f"{name}, {mode}: increments/s"] = increments / elapsed
            report[f"{name}, {mode}: net vs dict"] = net_base / net
            print(
                f"  {name:<20} {increments / elapsed:14,.0f} {ns:8.1f} {net:7.1f}"
                f" {base / elapsed:7.2f}x {net_base / net:11.2f}x"
            )

    print("\nMemory per key, after one increment of each key:")
    print("  dict and twin: tracemalloc (Python's allocations, as requested sizes);")
    print("  compiled: growth of resident memory (its rows live in slabs mapped from the OS).")
    for name, per_key in figures.items():
        ratios = "   ".join(
            f"{per_key / figures[base]:.2f} of {base}"
            for base in ("dict, own key strings", "dict, shared strings")
        )
        print(f"  {name:<24} {per_key:7.1f} B/key   {ratios}")
        report[f"{name}: bytes/key"] = per_key
    print(
        "  ('own key strings': the dict keeps the str objects of the first hit on each key,"
        " as the server's would; 'shared': they live elsewhere and are not counted.)"
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
