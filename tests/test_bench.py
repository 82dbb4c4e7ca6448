"""The benchmark harness's plan: where the servers and wrk run for each number of workers, and
the scaling it reports; the flush benchmark's options. (The benchmarks themselves print
figures; no test asserts a timing.)"""

from __future__ import annotations

import pytest

from loadtests import bench_flush
from loadtests.bench import Placement, Run, placement, scaling


@pytest.mark.parametrize(
    ("cores", "workers", "expected"),
    [
        # This machine: one worker and wrk on a core each; two share both cores.
        (2, 1, Placement("0", "1", 1, 64)),
        (2, 2, Placement("0,1", "0,1", 1, 128)),
        # The 16-core machine: N workers on N cores, wrk on the rest, a thread per core up to N.
        (16, 1, Placement("0", "1", 1, 64)),
        (16, 4, Placement("0,1,2,3", "4,5,6,7", 4, 256)),
        (16, 8, Placement("0,1,2,3,4,5,6,7", "8,9,10,11,12,13,14,15", 8, 512)),
        (16, 14, Placement(",".join(map(str, range(14))), "14,15", 2, 896)),
    ],
)
def test_workers_get_cores_of_their_own_and_wrk_the_rest(
    cores: int, workers: int, expected: Placement
) -> None:
    assert placement(list(range(cores)), workers) == expected


def test_the_cores_are_the_ones_given() -> None:
    assert placement([3, 5, 8], 2) == Placement("3,5", "8", 1, 128)


def test_scaling_is_requests_per_second_over_n_times_one_workers() -> None:
    medians = {
        "nginx empty_gif": Run(100_000, 0.3, 1.0),
        "pixel-server": Run(90_000, 0.3, 1.0),
        "nginx empty_gif x4": Run(380_000, 0.3, 1.0),
        "pixel-server x4": Run(270_000, 0.3, 1.0),
    }
    assert scaling(medians, [1, 4]) == {
        "nginx empty_gif x4": pytest.approx(0.95),
        "pixel-server x4": pytest.approx(0.75),
    }
    # Without one worker's run there is nothing to scale against.
    del medians["pixel-server"]
    assert scaling(medians, [4]) == {"nginx empty_gif x4": pytest.approx(0.95)}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--warm-memory", "0"], "argument --warm-memory: invalid positive_int value: '0'"),
        (["--rounds", "-3"], "argument --rounds: invalid positive_int value: '-3'"),
        (
            ["--stalls-only", "--million-only"],
            "argument --million-only: not allowed with argument --stalls-only",
        ),
        (
            ["--stalls-only", "--warm-memory", "512"],
            "--rounds and --warm-memory are for the million-key flushes, not --stalls-only",
        ),
    ],
)
def test_bench_flush_refuses_bad_options_before_it_starts_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_flush.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
