"""report.py: the phase x category table of a step and the --gpumem-report summary table."""
from __future__ import annotations

from gpumem_factories import make_report
from pytest_gpumem._core.categories import CATEGORIES, Category
from pytest_gpumem._core.units import format_bytes
from pytest_gpumem._core.text_table import render_table
from pytest_gpumem._reporting.tables import _SHORT, STEP_LEGEND, SummaryRow, step_table, summary_table


def _row(nodeid="t.py::test_a", **kw) -> SummaryRow:
    report = make_report()
    values = dict(nodeid=nodeid, backend=report.backend, budget=2 * report.peak, peak=report.peak, headroom=0.5,
                  peak_phase=report.peak_phase.value, split=report.peak_split)
    values.update(kw)
    return SummaryRow(**values)


def test_render_table_pads_columns_left_then_right():
    text = render_table(["name", "bytes"], [["a", "1"], ["longer", "1000"]])
    assert text.splitlines() == ["name    bytes", "------  -----", "a           1", "longer   1000"]


def test_render_table_left_columns_and_blank_trailing_cells():
    text = render_table(["", "n", ""], [["x", "1", "<-- differs"], ["yy", "22", ""]], left=(2,))
    assert text.splitlines() == ["     n", "--  --  -----------", "x    1  <-- differs", "yy  22"]


def test_step_table_shows_the_peak_step_and_marks_the_peak_phase():
    report = make_report(activations=3_000_000)
    lines = step_table(report).splitlines()
    assert lines[0].startswith(f"{report.backend} backend, {report.device}: peak {format_bytes(report.peak)} during "
                               f"{report.peak_phase.value} of the {report.peak_step.label} step")
    assert "-v: all 2 steps" in lines[0]
    assert lines[1].split()[:3] == ["step/phase", "peak", "retained"]
    assert lines[1].split()[3:] == [c.value for c in CATEGORIES]
    rows = [ln for ln in lines if ln.startswith(("first/", "steady/"))]
    assert len(rows) == len(report.peak_step.phases)
    (marked,) = [ln for ln in rows if ln.endswith("<- peak")]
    assert marked.startswith(f"{report.peak_step.label}/{report.peak_phase.value} ")
    assert format_bytes(report.peak) in marked
    assert STEP_LEGEND in lines
    assert f"note: {report.notes[0]}" in lines


def test_step_table_verbose_lists_every_step():
    report = make_report(steps=3)
    quiet = step_table(report)
    loud = step_table(report, verbose=True)
    rows = [ln for ln in loud.splitlines() if ln.startswith(("first/", "steady/"))]
    assert len(rows) == sum(len(s.phases) for s in report.steps)
    assert len(rows) > len([ln for ln in quiet.splitlines() if ln.startswith(("first/", "steady/"))])
    assert "-v: all" not in loud


def test_step_table_says_which_step_is_larger_in_words():
    report = make_report()  # the factory's steady step holds optimizer state from the start: it is larger
    assert report.larger_step == "steady"
    assert "steady steps need more than the first" in step_table(report)


def test_summary_table_has_a_row_per_test_with_headroom_and_split():
    row = _row()
    text = summary_table([row, _row("t.py::test_b", budget=None, headroom=None, status="FAILED")], wide=True)
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["test", "backend", "budget", "peak", "headroom", "peak"]
    first = lines[2].split()
    assert first[0] == "t.py::test_a"
    assert " ".join(first[2:4]) == format_bytes(row.budget)
    assert "50.0%" in first
    assert first[-1] == "ok"
    second = lines[3]
    assert second.startswith("t.py::test_b") and second.endswith("FAILED")
    assert " - " in second  # no budget, no headroom
    assert format_bytes(row.split[Category.ACTIVATIONS]) in lines[2]
    # legend explains the words a new user meets
    assert "headroom: share of the budget left unused" in text
    assert "backend emulated: no GPU used" in text


def test_summary_table_hides_max_batch_unless_a_test_has_one():
    assert "max batch" not in summary_table([_row()])
    text = summary_table([_row(), _row("t.py::test_b", max_batch=48)])
    header = text.splitlines()[0]
    assert "max batch" in header
    assert text.splitlines()[3].split()[-2] == "48"


def test_summary_table_marks_reserved_budgets():
    text = summary_table([_row(kind="reserved")])
    assert f"{format_bytes(_row().budget)} reserved" in text
    assert "reserved: that budget and its headroom are on reserved memory" in text


def test_summary_table_phase_rows_are_indented_under_their_test():
    phases = {"t.py::test_a": [("first/forward", 1024), ("first/backward", 4096)]}
    lines = summary_table([_row(), _row("t.py::test_b")], phases=phases, wide=True).splitlines()
    assert lines[3].split() == ["first/forward", "1.00", "KiB"] and lines[3].startswith("  ")
    assert lines[4].split() == ["first/backward", "4.00", "KiB"]
    assert lines[5].startswith("t.py::test_b")


def test_default_summary_fits_120_columns_and_keeps_the_test_name():
    long_id = "tests/models/test_transformers.py::test_" + "very_long_parametrised_name_" * 6 + "[adamw-bf16]"
    text = summary_table([_row(long_id), _row("t.py::test_b", budget=None, headroom=None)])
    assert max(map(len, text.splitlines())) <= 120
    row = text.splitlines()[2]
    assert row.startswith("\u2026") and "[adamw-bf16]" in row  # cut from the left: the test's own name stays
    header = text.splitlines()[0].split()
    assert "backend" not in header and "activ" not in header and "largest" in header  # one backend: no column


def test_default_summary_names_the_largest_category_and_its_share():
    row = _row()
    top = max(CATEGORIES, key=lambda c: row.split.get(c, 0))
    share = row.split[top] / row.peak * 100
    assert row.largest.split()[1] == f"{share:.0f}%"
    assert summary_table([row]).splitlines()[2].split()[-2:] == [f"{share:.0f}%", "ok"]


def test_backend_column_appears_when_tests_ran_on_several():
    text = summary_table([_row(), _row("t.py::test_b", backend="cpu")])
    assert text.splitlines()[0].split()[:2] == ["test", "backend"]


def test_wide_summary_shows_every_category_however_long():
    long_id = "t.py::test_" + "x" * 150
    text = summary_table([_row(long_id)], wide=True)
    assert long_id in text and all(_SHORT[c] in text.splitlines()[0] for c in CATEGORIES)


def test_leak_column_appears_when_a_test_leaked():
    text = summary_table([_row(), _row("t.py::test_b", leak=3 * 2**20)])
    assert "leak" in text.splitlines()[0].split()
    assert "3.00 MiB" in text.splitlines()[3]
