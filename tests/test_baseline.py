"""Baselines and the regression gate: spec parsing, save/load round trip, findings, refusals, atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gpumem_factories import make_record, make_report
from pytest_gpumem._reporting.baseline import (
    Baseline,
    BaselineError,
    Rule,
    check_compatible,
    check_regression,
    load_baseline,
    parse_regression_spec,
    save_baseline_atomic,
)
from pytest_gpumem._core.categories import Category
from pytest_gpumem._core.records import TestRecord
from pytest_gpumem._core.units import format_bytes

MiB = 2**20
NODE = "tests/test_model.py::test_step"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(path: Path, *records: TestRecord) -> Baseline:
    report = records[0].report
    return save_baseline_atomic(path, list(records), backend=report.backend, device=report.device)


# --------------------------------------------------------------------------- parse_regression_spec


@pytest.mark.parametrize(
    ("text", "rules"),
    [
        ("5%", [Rule("peak", fraction=0.05, text="5%")]),
        ("+5%", [Rule("peak", fraction=0.05, text="+5%")]),
        ("2.5%", [Rule("peak", fraction=0.025, text="2.5%")]),
        ("0%", [Rule("peak", fraction=0.0, text="0%")]),
        ("+64MiB", [Rule("peak", nbytes=64 * MiB, text="+64MiB")]),
        ("64MB", [Rule("peak", nbytes=64 * 10**6, text="64MB")]),
        ("peak:5%", [Rule("peak", fraction=0.05, text="peak:5%")]),
        ("activations:5%", [Rule("activations", fraction=0.05, text="activations:5%")]),
        ("Activations:+1KiB", [Rule("activations", nbytes=1024, text="Activations:+1KiB")]),
        ("reserved:10%", [Rule("reserved", fraction=0.10, text="reserved:10%")]),
        ("*:10%", [Rule("*", fraction=0.10, text="*:10%")]),
        ("5%,activations:10%,+64MiB", [Rule("peak", fraction=0.05, text="5%"),
                                       Rule("activations", fraction=0.10, text="activations:10%"),
                                       Rule("peak", nbytes=64 * MiB, text="+64MiB")]),
        (" 5% , grads:+1 MiB ", [Rule("peak", fraction=0.05, text="5%"),
                                 Rule("grads", nbytes=MiB, text="grads:+1 MiB")]),
    ],
)
def test_parse_regression_spec_accepts(text: str, rules: list[Rule]) -> None:
    assert list(parse_regression_spec(text).rules) == rules


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("5", "needs '%' or a unit"),
        ("-5%", "not a percentage or a size"),
        ("5%%", "not a percentage or a size"),
        ("abc", "not a percentage or a size"),
        ("+64Mb", "bits"),
        ("foo:5%", "unknown scope 'foo'"),
        ("activations:", "not a percentage or a size"),
        ("5%,,10%", "empty rule"),
        ("5%,10%", "two fraction limits for 'peak'"),
        ("+1MiB,peak:+2MiB", "two bytes limits for 'peak'"),
    ],
)
def test_parse_regression_spec_rejects_with_text_and_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_regression_spec(text)
    message = str(info.value)
    assert repr(text) in message
    assert why in message
    if "two" not in why:
        assert "e.g. '5%', '+64MiB'" in message


# --------------------------------------------------------------------------- save / load round trip


def test_round_trip_passes_and_file_is_diff_friendly(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    records = [make_record("tests/b.py::test_b"), make_record("tests/a.py::test_a", activations=3 * MiB)]
    save(path, *records)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert list(data["tests"]) == ["tests/a.py::test_a", "tests/b.py::test_b"]
    assert (data["schema"], data["version"], data["backend"]) == ("pytest-gpumem/baseline", 1, "emulated")
    assert set(data["tests"]["tests/a.py::test_a"]) == {"peak_bytes", "reserved_peak_bytes", "category_peaks", "phase_peaks"}

    baseline = load_baseline(path)
    spec = parse_regression_spec("0%,*:0%,reserved:0%")
    for record in records:
        result = check_regression(record.nodeid, record.report, baseline, spec)
        assert (result.failed, result.shrunk, result.missing, result.message) == (False, (), False, None)
    # Saving the same records again gives the same bytes: no timestamps, stable order.
    before = path.read_bytes()
    save(path, *reversed(records))
    assert path.read_bytes() == before


def test_entry_holds_peak_category_and_phase_peaks(tmp_path: Path) -> None:
    report = make_report()
    baseline = save(tmp_path / "base.json", make_record(NODE, report))
    entry = load_baseline(tmp_path / "base.json").entries[NODE]
    assert entry == baseline.entries[NODE]
    # make_report()'s sizes: params 400,000, grads 400,000, optimizer 800,000, batch 100,000, activations 1,258,291,
    # temporaries 50,000; the steady step's forward holds all but the grads: 2,608,291 B, reserved 2 MiB above it
    assert entry.peak == 400_000 + 800_000 + 100_000 + 1_258_291 + 50_000 == 2_608_291
    assert entry.category_peaks == {"params": 400_000, "grads": 400_000, "optimizer": 800_000, "batch": 100_000,
                                    "activations": 1_258_291, "temporaries": 50_000, "other": 0}
    # per phase, the larger of the two steps: setup p+o, batch +b, forward +a+t, backward half the activations
    # and the grads, optimizer and zero_grad p+o+b+g
    assert entry.phase_peaks == {"setup": 1_200_000, "batch": 1_300_000, "forward": 2_608_291,
                                 "backward": 1_300_000 + 1_258_291 // 2 + 400_000 + 50_000,
                                 "optimizer": 1_700_000, "zero_grad": 1_700_000}
    assert entry.reserved_peak == 2_608_291 + 2 * MiB


def test_merge_keeps_entries_not_measured_again(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    old = save(path, make_record("t::a"), make_record("t::b"))
    save(path, make_record("t::b", activations=2 * MiB))  # merges with what the file holds
    entries = load_baseline(path).entries
    assert sorted(entries) == ["t::a", "t::b"]
    assert entries["t::a"] == old.entries["t::a"]
    assert entries["t::b"].category_peaks["activations"] == 2 * MiB


# --------------------------------------------------------------------------- findings


def test_grown_category_message_matches_the_issue_example(tmp_path: Path) -> None:
    # 1.20 MiB -> 1.50 MiB of activations: the sentence of the issue, figure for figure.
    old, new = make_report(activations=1_258_291), make_report(activations=1_572_864)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("activations:5%"))
    assert result.message == (
        "gpumem regression: activations grew 1.20 MiB -> 1.50 MiB (+0.30 MiB, +25.0%) over the 5% allowed "
        "vs baseline base.json"
    )


def test_grown_category_finding_has_exact_bytes_and_fraction(tmp_path: Path) -> None:
    old, new = make_report(activations=3 * MiB), make_report(activations=4 * MiB)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("activations:10%"))
    assert result.failed and len(result.grown) == 1
    finding = result.grown[0]
    before, after = 3 * MiB, 4 * MiB  # the activations each report was built with
    assert (old.category_peak(Category.ACTIVATIONS), new.category_peak(Category.ACTIVATIONS)) == (before, after)
    assert (finding.scope, finding.baseline, finding.now) == ("activations", before, after)
    assert finding.growth == after - before
    assert finding.fraction == pytest.approx((after - before) / before)
    assert format_bytes(after - before, signed=True) in result.message
    assert f"{(after - before) / before * 100:+.1f}%" in result.message
    # The total peak rule is separate: the same growth passes a generous peak limit.
    allowed = (new.peak - old.peak) / old.peak * 100 + 1
    assert not check_regression(NODE, new, baseline, parse_regression_spec(f"{allowed:.2f}%")).failed


@pytest.mark.parametrize(("extra", "fails"), [(64 * MiB, False), (64 * MiB + 1, True)])
def test_absolute_limit_is_inclusive(tmp_path: Path, extra: int, fails: bool) -> None:
    old = make_report(batch=MiB)
    new = make_report(batch=MiB + extra)
    assert new.peak - old.peak == extra  # the batch is live at the peak
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("+64MiB"))
    assert result.failed is fails
    if fails:
        assert result.grown[0].growth == extra
        assert "over the +64.00 MiB allowed" in result.message


@pytest.mark.parametrize(("grow_by", "fails"), [(0, False), (1, True)])
def test_percentage_limit_is_inclusive(tmp_path: Path, grow_by: int, fails: bool) -> None:
    old = make_report(activations=1_250_000)
    assert old.peak % 100 == 0  # so that 1% of it is a whole number of bytes
    limit = old.peak // 100
    new = make_report(activations=1_250_000 + limit + grow_by)
    assert new.peak - old.peak == limit + grow_by  # activations are live at the peak
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    assert check_regression(NODE, new, baseline, parse_regression_spec("1%")).failed is fails


def test_every_category_rule_finds_each_grown_category(tmp_path: Path) -> None:
    old, new = make_report(), make_report(params=500_000, grads=500_000, activations=2 * MiB)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("*:5%"))
    assert [f.scope for f in result.grown] == ["params", "grads", "activations"]


def test_shrunk_category_is_a_stale_warning_not_a_failure(tmp_path: Path) -> None:
    old, new = make_report(activations=4 * MiB), make_report(activations=2 * MiB)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("activations:5%"))
    assert not result.failed and result.message is None
    assert [(f.scope, f.growth) for f in result.shrunk] == [("activations", -2 * MiB)]
    assert "activations shrank 4.00 MiB -> 2.00 MiB (-2.00 MiB, -50.0%) past the 5% threshold" in result.stale_message
    assert "--gpumem-save-baseline" in result.stale_message


def test_small_shrink_within_threshold_is_quiet(tmp_path: Path) -> None:
    old, new = make_report(activations=4 * MiB), make_report(activations=4 * MiB - 1024)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    result = check_regression(NODE, new, baseline, parse_regression_spec("activations:5%"))
    assert result.shrunk == () and result.grown == ()


def test_missing_test_is_reported(tmp_path: Path) -> None:
    baseline = save(tmp_path / "base.json", make_record("t::other"))
    result = check_regression(NODE, make_report(), baseline, parse_regression_spec("5%"))
    assert result.missing and not result.failed
    assert NODE in result.missing_message and "base.json" in result.missing_message


def test_reserved_rule_is_skipped_when_not_measured(tmp_path: Path) -> None:
    old, new = make_report(backend="cpu"), make_report(backend="cpu", activations=8 * MiB)
    baseline = save(tmp_path / "base.json", make_record(NODE, old))
    assert check_regression(NODE, new, baseline, parse_regression_spec("reserved:0%")).grown == ()


# --------------------------------------------------------------------------- refusals


def _valid_text(tmp_path: Path) -> str:
    save(tmp_path / "good.json", make_record(NODE))
    return (tmp_path / "good.json").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda good: good[: len(good) // 2], "not valid JSON (corrupt or truncated?)"),
        (lambda good: "", "is empty"),
        (lambda good: "{not json", "not valid JSON"),
        (lambda good: good.replace('"version": 1', '"version": 2'), "version 2"),
        (lambda good: good.replace("pytest-gpumem/baseline", "pytest-gpumem/results"), "schema 'pytest-gpumem/results'"),
        (lambda good: "[1, 2]", "holds a JSON array"),
        (lambda good: good.replace('"peak_bytes": ', '"peak_bytes": -'), "malformed"),
        (lambda good: good.replace('"tests": {', '"tests": {"t::x": 3, '), "entry 't::x' is malformed"),
        (lambda good: good.replace('"backend": "emulated"', '"backend": 7'), "'backend' is missing"),
    ],
)
def test_bad_baseline_is_refused_and_left_unchanged(tmp_path: Path, content, problem: str) -> None:
    path = tmp_path / "base.json"
    path.write_text(content(_valid_text(tmp_path)), encoding="utf-8")
    digest, mtime = sha(path), path.stat().st_mtime_ns
    with pytest.raises(BaselineError) as info:
        load_baseline(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert (sha(path), path.stat().st_mtime_ns) == (digest, mtime)


def test_binary_and_missing_baselines_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BaselineError, match="not UTF-8"):
        load_baseline(binary)
    with pytest.raises(BaselineError, match="does not exist"):
        load_baseline(tmp_path / "nope.json")


def test_other_backend_or_device_is_refused_unless_allowed(tmp_path: Path) -> None:
    baseline = save(tmp_path / "base.json", make_record(NODE, make_report(backend="cuda", device="NVIDIA H100")))
    assert check_compatible(baseline, "cuda", "NVIDIA H100") is None
    with pytest.raises(BaselineError) as info:
        check_compatible(baseline, "emulated", "cuda (emulated on meta tensors)")
    assert "'cuda'" in str(info.value) and "'emulated'" in str(info.value)
    assert "--gpumem-allow-baseline-mismatch" in str(info.value)
    with pytest.raises(BaselineError, match="NVIDIA A100"):
        check_compatible(baseline, "cuda", "NVIDIA A100")
    assert check_compatible(baseline, "emulated", "cpu", allow_mismatch=True) is None


# --------------------------------------------------------------------------- atomic writes


def test_save_leaves_no_temp_file_and_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "base.json"
    save(path, make_record(NODE))
    assert sorted(p.name for p in path.parent.iterdir()) == ["base.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "base.json"
    save(path, make_record(NODE))
    digest = sha(path)

    def dump_half_then_fail(obj, stream, **kwargs):
        stream.write('{"schema": "pytest-gpumem/baseline", "tests": {')
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save(path, make_record(NODE, activations=9 * MiB))
    monkeypatch.undo()
    assert sha(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["base.json"]
    assert load_baseline(path).entries[NODE].category_peaks["activations"] == 1_258_291  # make_report()'s, not 9 MiB
