"""Bad input, as a user types it: every marker argument, option, ini key and baseline file below gets its
exact one-line message, and no file in the project changes (hashed before and after, new files included).

Marker mistakes error their own test only (the other test still passes); option and file mistakes stop the
run with a usage error before any test runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

# The accepted forms, as the messages state them (a change to the wording should fail here, on purpose).
SIZES = ("a non-negative number of bytes with an optional unit: B, kB/KB, MB, GB, TB (powers of 10) "
         "or KiB, MiB, GiB, TiB (powers of 2), e.g. '2GB', '1.5 GiB', '512MiB', 4096")
SIGNATURE = ("gpu_budget(total=None, *, params=None, grads=None, optimizer=None, batch=None, activations=None, "
             "temporaries=None, kind='allocated', backend=None, leak=None, rtol=None, atol=None, device=None, "
             "parallel=None)")
SPECS = ("comma-separated rules, each '[SCOPE:]LIMIT' where LIMIT is a percentage ('5%') or an absolute size "
         "('+64MiB') and SCOPE is 'peak' (the default), 'reserved', a category (params, grads, optimizer, batch, "
         "activations, temporaries, other) or '*' for every category; e.g. '5%', '+64MiB', 'activations:10%', "
         "'5%,activations:10%,+64MiB'")
RTOL = "expected a fraction such as 0.05, '5%', or 'off'"
NOTHING = ("sets nothing: give a total such as gpu_budget('2GB'), a per-category budget (activations='512MiB'), "
           "leak=, rtol=, backend= or parallel=")
BOOL = "expected true or false (also yes/no, on/off, 1/0)"

BASELINE = {"schema": "pytest-gpumem/baseline", "version": 1, "backend": "emulated",
            "device": "cuda (emulated on meta tensors)", "torch_version": "2.14.1",
            "tests": {"test_m.py::test_ok": {"peak_bytes": 1024, "reserved_peak_bytes": 2097152,
                                             "category_peaks": {"params": 512}, "phase_peaks": {"setup": 512}}}}
RESULTS = {"schema": "pytest-gpumem/results", "version": 1, "session": {}, "tests": []}


def _baseline(**changes) -> str:
    data = json.loads(json.dumps(BASELINE))
    data.update(changes)
    return json.dumps(data)


def _entry(**changes) -> str:
    data = json.loads(json.dumps(BASELINE))
    data["tests"]["test_m.py::test_ok"].update(changes)
    return json.dumps(data)


@dataclass
class Case:
    """One bad input: the files it needs, the command line, and the exact message it must produce."""

    args: tuple[str, ...] = ()
    files: dict[str, str | bytes] = field(default_factory=dict)
    marker: str | None = None       #: gpu_budget(...) arguments of the inner test (or several decorators)
    ini: str | None = None          #: lines of a [pytest] section
    message: str | Callable[[Path], str] = ""
    setup: Callable[[Path], None] | None = None


def marker(args: str, message: str) -> Case:
    return Case(marker=args, message=message)


def option(*args: str, message, files=None, setup=None) -> Case:
    return Case(args=args, message=message, files=files or {}, setup=setup)


def ini(lines: str, message: str) -> Case:
    return Case(ini=lines, message=message)


def baseline(content: str | bytes | None, message, setup=None) -> Case:
    files = {"b.json": content} if content is not None else {}
    return Case(args=("--gpumem-baseline=b.json",), files=files, message=message, setup=setup)


def _b(p: Path) -> str:
    return str(p / "b.json")


CASES: dict[str, Case] = {
    # -- gpu_budget marker arguments: the test errors at setup with this line, the other test passes --------
    "marker-empty": marker("", NOTHING),
    "marker-none": marker("None", NOTHING),
    "marker-total-none-kw": marker("total=None", NOTHING),
    "marker-fraction-of-a-byte": marker("1.5", "total=1.5: a bare number counts bytes and 1.5 is not a whole number; "
                                               "write the unit, e.g. '1.5GB' or '1.5GiB'"),
    "marker-fraction-string": marker("'1.5'", "total='1.5': a bare number counts bytes and '1.5' is not a whole "
                                              "number; write the unit, e.g. '1.5GB' or '1.5GiB'"),
    "marker-tiny-bare-number": marker("2", "total=2: a bare number counts bytes, and 2 B cannot hold a training "
                                           "step; write the unit, e.g. '2GB' or '2GiB' (or '2B' if you mean bytes)"),
    "marker-unknown-unit": marker("'2 parsecs'", f"total='2 parsecs': invalid byte size '2 parsecs': unknown unit "
                                                 f"'parsecs'; expected {SIZES}"),
    "marker-bits": marker("'2Gb'", f"total='2Gb': invalid byte size '2Gb': unknown unit 'Gb' (a lowercase 'b' means "
                                   f"bits; use 'B' for bytes); expected {SIZES}"),
    "marker-negative": marker("'-1GB'", f"total='-1GB': invalid byte size '-1GB': expected {SIZES}"),
    "marker-zero": marker("'0B'", "total='0B': a budget must be positive (use leak='0B' to forbid leaks)"),
    "marker-nan": marker("float('nan')", f"total=nan: invalid byte size nan: expected {SIZES}"),
    "marker-infinite": marker("float('inf')", f"total=inf: invalid byte size inf: expected {SIZES}"),
    "marker-huge-exponent": marker("'1e999GB'", f"total='1e999GB': invalid byte size '1e999GB': exponent out of "
                                                f"range; expected {SIZES}"),
    "marker-list": marker("[1]", f"total=[1]: invalid byte size [1] of type list: expected {SIZES}"),
    "marker-unknown-keyword": marker("'1GB', bogus=3", f"unknown keyword bogus; accepted: {SIGNATURE}"),
    "marker-misspelt-category": marker("activation='1GB'", f"unknown keyword activation; accepted: {SIGNATURE}"),
    "marker-two-positionals": marker("'1GB', '2GB'", f"takes at most one positional argument (the total), got 2: "
                                                     f"{SIGNATURE}"),
    "marker-total-twice": marker("'1GB', total='2GB'", "total given both positionally and as a keyword"),
    "marker-kind": marker("'1GB', kind='free'", "kind='free': expected one of 'allocated', 'reserved'"),
    "marker-reserved-categories": marker("kind='reserved', activations='1GB'",
                                         "per-category budgets apply to allocated bytes; kind='reserved' takes only "
                                         "a total"),
    "marker-reserved-no-total": marker("kind='reserved'", "kind='reserved' limits the total: give one, e.g. "
                                                          "gpu_budget('2GB', kind='reserved')"),
    "marker-backend": marker("'1GB', backend='tpu'", "backend='tpu': expected one of 'auto', 'cuda', 'cpu', "
                                                     "'emulated'"),
    "marker-leak": marker("'1GB', leak='lots'", f"leak='lots': invalid byte size 'lots': expected {SIZES}"),
    "marker-rtol-word": marker("'1GB', rtol='five'", f"rtol='five': {RTOL}"),
    "marker-rtol-negative": marker("'1GB', rtol=-0.1", "rtol=-0.1: must be a finite number >= 0"),
    "marker-rtol-true": marker("'1GB', rtol=True", f"rtol=True: {RTOL}"),
    "marker-rtol-empty": marker("'1GB', rtol=''", f"rtol='': {RTOL}"),
    "marker-category-fraction": marker("activations='1.5'", "activations='1.5': a bare number counts bytes and '1.5' "
                                                            "is not a whole number; write the unit, e.g. '1.5GB' or "
                                                            "'1.5GiB'"),
    "marker-twice": Case(marker="'1GB')\n@pytest.mark.gpu_budget('2GB'",
                         message="given 2 times on this test (stacked decorators, or a decorator plus pytest.param "
                                 "marks); give it once (a class or module marker is overridden by the test's own)"),
    # -- command-line options: a usage error before any test runs ----------------------------------------------
    "default-budget-zero": option("--gpumem-default-budget=0",
                                  message="--gpumem-default-budget='0': a budget must be positive"),
    "default-budget-word": option("--gpumem-default-budget=lots", message=f"--gpumem-default-budget='lots': invalid "
                                                                          f"byte size 'lots': expected {SIZES}"),
    "default-budget-fraction": option("--gpumem-default-budget=1.5",
                                      message="--gpumem-default-budget='1.5': a bare number counts bytes and '1.5' is "
                                              "not a whole number; write the unit, e.g. '1.5GB' or '1.5GiB'"),
    "rtol-empty": option("--gpumem-rtol=", message=f"--gpumem-rtol: rtol='': {RTOL}"),
    "rtol-word": option("--gpumem-rtol=five", message=f"--gpumem-rtol: rtol='five': {RTOL}"),
    "rtol-negative": option("--gpumem-rtol=-1", message="--gpumem-rtol: rtol='-1': must be a finite number >= 0"),
    "rtol-infinite": option("--gpumem-rtol=inf", message="--gpumem-rtol: rtol='inf': must be a finite number >= 0"),
    "fail-missing-alone": option("--gpumem-fail-missing", message="--gpumem-fail-missing needs a baseline to look "
                                                                  "tests up in: add --gpumem-baseline=PATH"),
    "allow-mismatch-alone": option("--gpumem-allow-baseline-mismatch",
                                   message="--gpumem-allow-baseline-mismatch applies to --gpumem-baseline or "
                                           "--gpumem-save-baseline, and neither is given"),
    "regression-without-baseline": option("--gpumem-fail-regression=5%", message="--gpumem-fail-regression=5% needs a "
                                          "baseline to compare with: add --gpumem-baseline=PATH"),
    "regression-bare-number": option("--gpumem-baseline=b.json", "--gpumem-fail-regression=5",
                                     files={"b.json": json.dumps(BASELINE)},
                                     message=f"invalid --gpumem-fail-regression '5': '5' needs '%' or a unit such as "
                                             f"'MiB'; expected {SPECS}"),
    "regression-unknown-scope": option("--gpumem-baseline=b.json", "--gpumem-fail-regression=bogus:5%",
                                       files={"b.json": json.dumps(BASELINE)},
                                       message=f"invalid --gpumem-fail-regression 'bogus:5%': unknown scope 'bogus' "
                                               f"in 'bogus:5%'; expected {SPECS}"),
    "json-empty-path": option("--gpumem-json=", message="--gpumem-json= is empty: give a file path"),
    "json-is-a-directory": option("--gpumem-json=out", setup=lambda p: (p / "out").mkdir(),
                                  message=lambda p: f"--gpumem-json={p / 'out'} is a directory; give a file path such "
                                                    f"as {p / 'out' / 'gpumem.json'}"),
    "json-dot": option("--gpumem-json=.", message=lambda p: f"--gpumem-json={p} is a directory; give a file path "
                                                            f"such as {p / 'gpumem.json'}"),
    "html-dot": option("--gpumem-html=.", message=lambda p: f"--gpumem-html={p} is a directory; give a file path "
                                                            f"such as {p / 'gpumem.json'}"),
    "save-baseline-directory": option("--gpumem-save-baseline=sub", setup=lambda p: (p / "sub").mkdir(),
                                      message=lambda p: f"--gpumem-save-baseline={p / 'sub'} is a directory; give a "
                                                        f"file path such as {p / 'sub' / 'gpumem.json'}"),
    "json-under-a-file": option("--gpumem-json=notes.txt/r.json", files={"notes.txt": "my notes\n"},
                                message=lambda p: f"--gpumem-json={p / 'notes.txt' / 'r.json'}: {p / 'notes.txt'} is a "
                                                  f"file, so no folder can be created there"),
    "baseline-as-json": option("--gpumem-baseline=b.json", "--gpumem-json=b.json", files={"b.json": json.dumps(BASELINE)},
                               message=lambda p: f"--gpumem-baseline and --gpumem-json name the same file "
                                                 f"({p / 'b.json'}): one run would overwrite the baseline; give each "
                                                 f"its own path"),
    "baseline-as-html": option("--gpumem-baseline=b.json", "--gpumem-html=b.json", files={"b.json": json.dumps(BASELINE)},
                               message=lambda p: f"--gpumem-baseline and --gpumem-html name the same file "
                                                 f"({p / 'b.json'}): one run would overwrite the baseline; give each "
                                                 f"its own path"),
    "baseline-as-save": option("--gpumem-baseline=b.json", "--gpumem-save-baseline=b.json",
                               files={"b.json": json.dumps(BASELINE)},
                               message=lambda p: f"--gpumem-baseline and --gpumem-save-baseline name the same file "
                                                 f"({p / 'b.json'}): one run would overwrite the baseline it is checked "
                                                 f"against; give each its own path"),
    "json-as-html": option("--gpumem-json=r.out", "--gpumem-html=r.out",
                           message=lambda p: f"--gpumem-json and --gpumem-html name the same file ({p / 'r.out'}): one "
                                             f"run would overwrite the other's output; give each its own path"),
    "json-as-save": option("--gpumem-json=x.json", "--gpumem-save-baseline=x.json",
                           message=lambda p: f"--gpumem-json and --gpumem-save-baseline name the same file "
                                             f"({p / 'x.json'}): one run would overwrite the other's output; give each "
                                             f"its own path"),
    "baseline-other-spelling": option("--gpumem-baseline=b.json", "--gpumem-json=sub/../b.json",
                                      files={"b.json": json.dumps(BASELINE)}, setup=lambda p: (p / "sub").mkdir(),
                                      message=lambda p: f"--gpumem-baseline and --gpumem-json name the same file "
                                                        f"({p / 'sub' / '..' / 'b.json'}): one run would overwrite the "
                                                        f"baseline; give each its own path"),
    "baseline-through-symlink": option("--gpumem-baseline=b.json", "--gpumem-json=link.json",
                                       files={"b.json": json.dumps(BASELINE)},
                                       setup=lambda p: (p / "link.json").symlink_to(p / "b.json"),
                                       message=lambda p: f"--gpumem-baseline and --gpumem-json name the same file "
                                                         f"({p / 'link.json'}): one run would overwrite the baseline; "
                                                         f"give each its own path"),
    "json-over-foreign-file": option("--gpumem-json=notes.txt", files={"notes.txt": "my notes\n"},
                                     message=lambda p: f"--gpumem-json={p / 'notes.txt'} exists and holds something "
                                                       f"other than pytest-gpumem results; refusing to overwrite it: "
                                                       f"give another path or delete it"),
    "json-over-a-baseline": option("--gpumem-json=b.json", files={"b.json": json.dumps(BASELINE)},
                                   message=lambda p: f"--gpumem-json={p / 'b.json'} exists and holds a "
                                                     f"'pytest-gpumem/baseline' document; refusing to overwrite it: "
                                                     f"give another path or delete it"),
    "html-over-foreign-page": option("--gpumem-html=index.html", files={"index.html": "<html>my site</html>\n"},
                                     message=lambda p: f"--gpumem-html={p / 'index.html'} exists and is not a "
                                                       f"pytest-gpumem HTML report; refusing to overwrite it: give "
                                                       f"another path or delete it"),
    "save-over-results": option("--gpumem-save-baseline=r.json", files={"r.json": json.dumps(RESULTS)},
                                message=lambda p: f"baseline {p / 'r.json'} has schema 'pytest-gpumem/results', expected "
                                                  f"'pytest-gpumem/baseline'; is it a baseline file?"),
    "save-over-fifo": option("--gpumem-save-baseline=pipe", setup=lambda p: os.mkfifo(p / "pipe"),
                             message=lambda p: f"--gpumem-save-baseline={p / 'pipe'} is not a regular file (a FIFO); "
                                               f"give a file path"),
    "snapshot-is-a-file": option("--gpumem-snapshot=notes.txt", files={"notes.txt": "my notes\n"},
                                 message=lambda p: f"--gpumem-snapshot={p / 'notes.txt'} is a file; give a folder for "
                                                   f"the snapshots"),
    # -- ini keys ------------------------------------------------------------------------------------------
    "ini-report-bool": ini("gpumem_report = maybe", f"gpumem_report = 'maybe' in the ini file: {BOOL}"),
    "ini-wide-bool": ini("gpumem_report_wide = 2", f"gpumem_report_wide = '2' in the ini file: {BOOL}"),
    "ini-fail-missing-bool": ini("gpumem_fail_missing = perhaps", f"gpumem_fail_missing = 'perhaps' in the ini file: "
                                                                  f"{BOOL}"),
    "ini-mismatch-bool": ini("gpumem_allow_baseline_mismatch = si", f"gpumem_allow_baseline_mismatch = 'si' in the ini "
                                                                    f"file: {BOOL}"),
    "ini-backend": ini("gpumem_backend = tpu", "gpumem_backend (ini) = 'tpu': expected one of auto, cuda, cpu, emulated"),
    "ini-default-budget": ini("gpumem_default_budget = 2 parsecs",
                              f"gpumem_default_budget (ini)='2 parsecs': invalid byte size '2 parsecs': unknown unit "
                              f"'parsecs'; expected {SIZES}"),
    "ini-rtol": ini("gpumem_rtol = five", f"gpumem_rtol (ini): rtol='five': {RTOL}"),
    "ini-regression-alone": ini("gpumem_fail_regression = 5%", "--gpumem-fail-regression=5% needs a baseline to "
                                                               "compare with: add --gpumem-baseline=PATH"),
    # -- baseline files given to --gpumem-baseline ---------------------------------------------------------
    "baseline-missing": baseline(None, lambda p: f"baseline {_b(p)} does not exist; create it with "
                                                 f"--gpumem-save-baseline={_b(p)}"),
    "baseline-empty": baseline("", lambda p: f"baseline {_b(p)} is empty (truncated?); restore it from version "
                                             f"control or save it again"),
    # the first 40 characters are '{"schema": "pytest-gpumem/baseline", "ve': the open string "ve starts at column 38
    "baseline-truncated": baseline(_baseline()[:40], lambda p: f"baseline {_b(p)} is not valid JSON (corrupt or "
                                   f"truncated?): Unterminated string starting at at line 1 column 38; restore it "
                                   f"from version control or save it again"),
    "baseline-not-utf8": baseline(b"\xff\xfe{}", lambda p: f"baseline {_b(p)} is not UTF-8 text (invalid start byte "
                                                           f"at byte 0)"),
    "baseline-array": baseline("[1, 2]", lambda p: f"baseline {_b(p)} holds a JSON array, expected an object with a "
                                                   f"'pytest-gpumem/baseline' header"),
    "baseline-results-document": baseline(json.dumps(RESULTS), lambda p: f"baseline {_b(p)} has schema "
                                          f"'pytest-gpumem/results', expected 'pytest-gpumem/baseline'; is it a "
                                          f"baseline file?"),
    "baseline-version-2": baseline(_baseline(version=2), lambda p: f"baseline {_b(p)} has version 2; this "
                                   f"pytest-gpumem reads version 1: save it again with --gpumem-save-baseline"),
    "baseline-version-true": baseline(_baseline(version=True), lambda p: f"baseline {_b(p)} has version True; this "
                                      f"pytest-gpumem reads version 1: save it again with --gpumem-save-baseline"),
    "baseline-backend-number": baseline(_baseline(backend=7), lambda p: f"baseline {_b(p)}: header field 'backend' is "
                                                                        f"missing or not a string"),
    "baseline-no-tests": baseline(_baseline(tests=[]), lambda p: f"baseline {_b(p)}: 'tests' is missing or not an "
                                                                 f"object keyed by test nodeid"),
    "baseline-entry-number": baseline(_baseline(tests={"t::x": 3}), lambda p: f"baseline {_b(p)}: entry 't::x' is "
                                      f"malformed: expected an object, got a JSON number"),
    "baseline-entry-no-peak": baseline(_baseline(tests={"t::x": {}}), lambda p: f"baseline {_b(p)}: entry 't::x' is "
                                       f"malformed: missing 'peak_bytes'"),
    "baseline-negative-peak": baseline(_entry(peak_bytes=-1), lambda p: f"baseline {_b(p)}: entry 'test_m.py::test_ok' "
                                       f"is malformed: peak_bytes: expected a non-negative integer number of bytes, "
                                       f"got -1"),
    "baseline-float-peak": baseline(_entry(peak_bytes=1.5), lambda p: f"baseline {_b(p)}: entry 'test_m.py::test_ok' "
                                    f"is malformed: peak_bytes: expected a non-negative integer number of bytes, got "
                                    f"1.5"),
    "baseline-huge-peak": baseline(_entry(peak_bytes=10**400), lambda p: f"baseline {_b(p)}: entry "
                                   f"'test_m.py::test_ok' is malformed: peak_bytes: 10000000000000000000..."
                                   f"0000000000 (401 characters) bytes is beyond any device (at most 2**63 - 1)"),
    "baseline-category-list": baseline(_entry(category_peaks=[1, 2]), lambda p: f"baseline {_b(p)}: entry "
                                       f"'test_m.py::test_ok' is malformed: category_peaks: expected an object of "
                                       f"byte counts keyed by name, got a JSON array"),
    "baseline-phase-string": baseline(_entry(phase_peaks="setup"), lambda p: f"baseline {_b(p)}: entry "
                                      f"'test_m.py::test_ok' is malformed: phase_peaks: expected an object of byte "
                                      f"counts keyed by name, got a JSON string"),
    "baseline-category-bool": baseline(_entry(category_peaks={"params": True}), lambda p: f"baseline {_b(p)}: entry "
                                       f"'test_m.py::test_ok' is malformed: category_peaks.params: expected a "
                                       f"non-negative integer number of bytes, got True"),
    "baseline-nan": baseline(_baseline().replace('"peak_bytes": 1024', '"peak_bytes": NaN'),
                             lambda p: f"baseline {_b(p)} holds a value JSON readers refuse: NaN is not a JSON number"),
    "baseline-5000-digits": baseline(_baseline().replace('"peak_bytes": 1024', '"peak_bytes": ' + "9" * 5000),
                                     lambda p: f"baseline {_b(p)} holds a value JSON readers refuse: Exceeds the limit "
                                               f"(4300 digits) for integer string conversion: value has 5000 digits; "
                                               f"use sys.set_int_max_str_digits() to increase the limit"),
    "baseline-deep-nesting": baseline("[" * 100_000 + "]" * 100_000, lambda p: f"baseline {_b(p)} nests arrays/objects "
                                      f"deeper than 64 levels; it is not a baseline file"),
    "baseline-directory": baseline(None, lambda p: f"baseline {_b(p)} is a directory, not a file",
                                   setup=lambda p: (p / "b.json").mkdir()),
    "baseline-fifo": baseline(None, lambda p: f"baseline {_b(p)} is not a regular file (a FIFO); give the path of a "
                                              f"JSON file", setup=lambda p: os.mkfifo(p / "b.json")),
    "baseline-dev-zero": Case(args=("--gpumem-baseline=/dev/zero",),
                              message="baseline /dev/zero is not a regular file (a character device); give the path "
                                      "of a JSON file"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (or its kind), caches excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts or ".pytest_cache" in p.parts:
            continue
        mode = os.lstat(p).st_mode
        if stat.S_ISREG(mode):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = stat.filemode(mode)
    return out


TESTS = '''
import pytest

{decorator}def test_ok():
    pass

def test_other():
    pass
'''


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_its_exact_message_and_changes_no_file(pytester: pytest.Pytester, name: str) -> None:
    case = CASES[name]
    decorator = f"@pytest.mark.gpu_budget({case.marker})\n" if case.marker is not None else ""
    pytester.makepyfile(test_m=TESTS.format(decorator=decorator))
    if case.ini is not None:
        pytester.makeini(f"[pytest]\n{case.ini}\n")
    for rel, content in case.files.items():
        target = pytester.path / rel
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content, encoding="utf-8")
    if case.setup is not None:
        case.setup(pytester.path)
    before = _snapshot(pytester.path)
    result = pytester.runpytest("-p", "no:cacheprovider", *case.args)
    message = case.message(pytester.path) if callable(case.message) else case.message
    if case.marker is not None:
        result.assert_outcomes(passed=1, errors=1)  # the bad marker errors its own test; the other one runs
        assert f"test_m.py::test_ok: invalid gpu_budget marker: {message}" in result.stdout.lines
    else:
        assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
        assert f"ERROR: {message}" in result.stderr.lines, result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert _snapshot(pytester.path) == before  # nothing written, nothing removed, nothing created


def test_the_table_is_at_least_sixty_inputs() -> None:
    assert len(CASES) >= 60


@pytest.mark.skipif(not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and os.getuid() != 0,
                    reason="needs a folder this user cannot write in")
def test_unwritable_folder_is_refused_at_startup(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=TESTS.format(decorator=""))
    result = pytester.runpytest("-p", "no:cacheprovider", "--gpumem-json=/sys/gpumem-results.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --gpumem-json=/sys/gpumem-results.json: cannot write in /sys: *"])
