"""_core/budget.py: the gpu_budget argument table, the checks at the boundary, and the failure sentences."""
from __future__ import annotations

import pytest

from gpumem_factories import make_report
from pytest_gpumem._core.budget import (
    MARKER_SIGNATURE,
    Budget,
    BudgetError,
    budget_from_marker,
    check_budget,
    headroom,
)
from pytest_gpumem._core.categories import Category
from pytest_gpumem._core.units import format_bytes, format_percent

GiB = 2**30


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("2GB",), {}, Budget(total=2_000_000_000)),
        (("2GiB",), {}, Budget(total=2 * GiB)),
        ((), {"total": 4096}, Budget(total=4096)),
        ((), {"activations": "1MiB", "params": "1kB"},
         Budget(categories={Category.ACTIVATIONS: 2**20, Category.PARAMS: 1000})),
        (("1GB",), {"kind": "reserved"}, Budget(total=10**9, kind="reserved")),
        (("1GB",), {"backend": "cpu"}, Budget(total=10**9, backend="cpu")),
        (("1GB",), {"leak": "0B"}, Budget(total=10**9, leak=0)),
        ((), {"rtol": 0.05}, Budget(rtol=0.05)),
        ((), {"rtol": "5%"}, Budget(rtol=0.05)),  # the same forms as --gpumem-rtol
        ((), {"rtol": False}, Budget(rtol=False)),
        ((None,), {"backend": "cpu"}, Budget(backend="cpu")),  # None: no total, the backend still counts
        ((2e9,), {}, Budget(total=2_000_000_000)),  # a whole float counts bytes
    ],
)
def test_marker_arguments_accepted(args, kwargs, expected):
    assert budget_from_marker(args, kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        (("2 parsecs",), {}, "'2 parsecs'"),
        (("2Gb",), {}, "bits"),
        (("-1GB",), {}, "'-1GB'"),
        (("0B",), {}, "must be positive"),
        ((), {"bogus": 1}, "bogus"),
        ((), {"activation": "1GB"}, "activation"),
        (("1GB", "2GB"), {}, "at most one positional"),
        (("1GB",), {"total": "2GB"}, "both positionally and as a keyword"),
        (("1GB",), {"kind": "free"}, "kind='free'"),
        ((), {"kind": "reserved", "activations": "1GB"}, "kind='reserved' takes only a total"),
        (("1GB",), {"backend": "tpu"}, "backend='tpu'"),
        (("1GB",), {"leak": "lots"}, "leak='lots'"),
        (("1GB",), {"rtol": "five"}, "rtol='five'"),
        (("1GB",), {"rtol": -0.1}, "rtol=-0.1"),
        (("1GB",), {"rtol": True}, "rtol=True"),
        (("1GB",), {"grads": [1]}, "grads=[1]"),
        ((), {}, "sets nothing"),
        ((None,), {}, "sets nothing"),
        ((1.5,), {}, "1.5 is not a whole number"),
        (("1.5",), {}, "'1.5' is not a whole number"),
        ((2,), {}, "2 B cannot hold a training step"),
        ((), {"kind": "reserved"}, "kind='reserved' limits the total"),
        (("1GB",), {"rtol": ""}, "rtol=''"),
    ],
)
def test_marker_arguments_rejected_naming_the_value(args, kwargs, named):
    with pytest.raises(BudgetError) as info:
        budget_from_marker(args, kwargs)
    assert named in str(info.value)


def test_unknown_keyword_lists_the_signature():
    with pytest.raises(BudgetError, match="unknown keyword") as info:
        budget_from_marker((), {"actvations": "1GB"})
    assert MARKER_SIGNATURE in str(info.value)


def test_total_budget_boundary_equal_passes_one_byte_less_fails():
    report = make_report()
    # the factory's steady forward: params + optimizer + batch + activations + temporaries
    assert report.peak == 400_000 + 800_000 + 100_000 + 1_258_291 + 50_000 == 2_608_291
    assert check_budget(report, Budget(total=report.peak)) == []
    (overrun,) = check_budget(report, Budget(total=report.peak - 1))
    assert overrun.over_by == 1


def test_total_overrun_sentence_names_peak_excess_phase_and_mix():
    report = make_report(params=400_000, optimizer=800_000, batch=100_000, activations=1_258_291, temporaries=50_000)
    limit = report.peak - 100_000
    (overrun,) = check_budget(report, Budget(total=limit))
    mix = sorted(((b, c) for c, b in report.peak_split.items() if b > 0), key=lambda bc: -bc[0])
    expected = (
        f"gpu_budget {format_bytes(limit)} exceeded: peak {format_bytes(report.peak)} "
        f"({format_bytes(100_000, signed=True)}, {format_percent(100_000 / limit)}) "
        f"during {report.peak_phase.value}; " + ", ".join(f"{c.value} {format_bytes(b)}" for b, c in mix)
    )
    assert overrun.sentence == expected
    # largest category first, zero categories left out
    assert overrun.sentence.split("; ")[1].startswith(f"{mix[0][1].value} ")
    assert "other" not in overrun.sentence.split("; ")[1]


def test_category_budget_checks_the_category_peak_over_all_phases():
    report = make_report(activations=3_000_000)
    peak_activations = report.category_peak(Category.ACTIVATIONS)
    assert peak_activations == 3_000_000
    assert check_budget(report, Budget(categories={Category.ACTIVATIONS: peak_activations})) == []
    (overrun,) = check_budget(report, Budget(categories={Category.ACTIVATIONS: peak_activations - 1}))
    assert overrun.sentence.startswith(
        f"gpu_budget activations={format_bytes(peak_activations - 1)} exceeded: activations peaked at "
        f"{format_bytes(peak_activations)}"
    )
    assert overrun.sentence.endswith("during forward")  # the factory's activations peak in forward


def test_total_and_category_overruns_are_all_reported():
    report = make_report()
    overruns = check_budget(report, Budget(total=1, categories={Category.PARAMS: 1, Category.GRADS: 1}))
    assert [o.sentence.split(" exceeded")[0] for o in overruns] == [
        f"gpu_budget {format_bytes(1)}", f"gpu_budget params={format_bytes(1)}", f"gpu_budget grads={format_bytes(1)}",
    ]


def test_reserved_budget_uses_the_reserved_peak():
    report = make_report()
    reserved = report.reserved_peak
    assert reserved == 2_608_291 + 2 * 2**20  # the factory reserves 2 MiB above each phase's allocated peak
    assert check_budget(report, Budget(total=reserved, kind="reserved")) == []
    # the allocated peak fits this budget, the reserved one does not
    (overrun,) = check_budget(report, Budget(total=reserved - 1, kind="reserved"))
    assert overrun.sentence.startswith(f"gpu_budget {format_bytes(reserved - 1)} (reserved) exceeded: reserved peak")
    assert check_budget(report, Budget(total=reserved - 1)) == []


def test_reserved_budget_on_cpu_backend_says_why_it_cannot_be_checked():
    report = make_report(backend="cpu", device="cpu")
    assert report.reserved_peak is None
    with pytest.raises(BudgetError, match="cpu backend"):
        check_budget(report, Budget(total=10**9, kind="reserved"))


def test_headroom_is_the_fraction_left():
    report = make_report()
    assert headroom(report, Budget(total=2 * report.peak)) == pytest.approx(0.5)
    assert headroom(report, Budget(total=report.peak)) == 0
    half = report.peak // 2  # 1,304,145 B: the peak overruns it by a whole budget (and one byte)
    assert headroom(report, Budget(total=half)) == pytest.approx((half - 2_608_291) / half) == pytest.approx(-1, abs=1e-6)
    assert headroom(report, None) is None
    assert headroom(report, Budget(categories={Category.PARAMS: 1})) is None


def test_budget_to_dict_is_plain_data():
    budget = budget_from_marker(("1GB",), {"activations": "1MiB", "leak": "0B"})
    assert budget.to_dict() == {
        "total_bytes": 10**9, "categories": {"activations": 2**20}, "kind": "allocated", "leak_bytes": 0,
    }
    assert not budget.is_empty and Budget(leak=0).is_empty
