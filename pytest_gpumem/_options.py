"""Every pytest-gpumem option once: its CLI flag, its ini key, and how a value is read.

A CLI flag defaults to None, so an ini key counts unless the flag is given (pytest-memray's CLI defaults
shadowed their ini keys). Paths from the CLI are relative to the invocation folder, paths from the ini
file to the ini file's folder. A bad ini boolean names its key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ._core.categories import BACKENDS

#: measurement and estimate must agree within this fraction unless a test or the ini says otherwise
DEFAULT_RTOL = "0.05"
#: ... or within this many bytes, so a tiny model's allocation order does not flap
DEFAULT_ATOL = "256KiB"
_TRUE = ("1", "true", "yes", "y", "on", "t")
_FALSE = ("0", "false", "no", "n", "off", "f", "")


@dataclass(frozen=True)
class Option:
    """One option: ``--gpumem-NAME`` on the command line, ``gpumem_NAME`` in the ini file."""

    name: str
    help: str
    kind: str = "text"        #: "text", "flag" (boolean) or "path"
    metavar: str | None = None
    ini_default: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return f"--gpumem-{self.name.replace('_', '-')}"

    @property
    def ini(self) -> str:
        return f"gpumem_{self.name}"


OPTIONS: tuple[Option, ...] = (
    Option("report", "print a table of measured tests: budget, peak, headroom, largest category (-v or "
           "--gpumem-report-wide: every column and each phase)", kind="flag"),
    Option("report_wide", "with --gpumem-report: every column (backend, each category) however wide", kind="flag"),
    Option("backend", "where bytes come from: auto (cuda if a GPU is present, else emulated), cuda, cpu, emulated",
           ini_default="auto", choices=BACKENDS),
    Option("default_budget", "budget for tests that use the gpumem fixture without a gpu_budget marker, e.g. 2GiB, "
           "or a share of the GPU's memory such as 90%", metavar="SIZE"),
    Option("device", "the GPU the emulated backend predicts, e.g. H100, H200, A100-80GB, L4 (its compute "
           "capability, memory and library workspaces); on the cuda backend the GPU present", metavar="GPU"),
    Option("rtol", "fail a measured test whose peak or any category differs from the analytical estimate by more "
           "than this fraction (default 0.05); 'off' disables the check", metavar="FRACTION", ini_default=DEFAULT_RTOL),
    Option("atol", "differences from the estimate below this many bytes never fail (default 256KiB)",
           metavar="SIZE", ini_default=DEFAULT_ATOL),
    Option("json", "write every gpumem figure of every test to this JSON file (schema 'pytest-gpumem/results' v1)",
           kind="path"),
    Option("save_baseline", "save the measured peaks to this baseline JSON file (meant to be committed); existing "
           "entries of tests not run are kept", kind="path"),
    Option("baseline", "compare every measured test with this saved baseline", kind="path"),
    Option("fail_regression", "fail tests that grew past these limits vs --gpumem-baseline, e.g. '5%', '+64MiB', "
           "'5%,activations:10%,+64MiB'", metavar="SPEC"),
    Option("allow_baseline_mismatch", "compare with (or save over) a baseline of another backend or device instead "
           "of refusing it", kind="flag"),
    Option("fail_missing", "fail measured tests that have no entry in --gpumem-baseline (default: warn)", kind="flag"),
    Option("html", "write a self-contained HTML report with per-test plots to this file", kind="path"),
    Option("snapshot", "cuda backend only: save a CUDA allocator snapshot per test into this folder", kind="path",
           metavar="DIR"),
)
BY_NAME = {o.name: o for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    """Every option as a CLI flag in the 'gpumem' group and as an ini key (call from pytest_addoption)."""
    group = parser.getgroup("gpumem", "GPU memory budgets (pytest-gpumem)")
    for o in OPTIONS:
        cli_help = o.help.replace("%", "%%")  # argparse formats help with %
        if o.kind == "flag":
            group.addoption(o.flag, action="store_true", default=None, dest=o.ini, help=cli_help)
            parser.addini(o.ini, help=f"{o.help} (true/false)", default="false")
        else:
            group.addoption(o.flag, action="store", default=None, dest=o.ini, choices=o.choices,
                            metavar=o.metavar or ("PATH" if o.kind == "path" else None), help=cli_help)
            parser.addini(o.ini, help=o.help, default=o.ini_default)


def source(config: pytest.Config, name: str) -> str:
    """How messages name where a value came from: the CLI flag, or the ini key."""
    option = BY_NAME[name]
    return option.flag if config.getoption(option.ini, default=None) is not None else f"{option.ini} (ini)"


def text(config: pytest.Config, name: str) -> str | None:
    """The CLI value when given (even ''), else the ini value; None when the ini leaves it empty."""
    option = BY_NAME[name]
    cli = config.getoption(option.ini, default=None)
    if cli is not None:
        return str(cli)
    value = str(config.getini(option.ini) or "").strip()
    return value if value else (option.ini_default or None)


def flag(config: pytest.Config, name: str) -> bool:
    """A boolean: the CLI flag when given, else the ini key read as true/false (UsageError naming the key)."""
    option = BY_NAME[name]
    if config.getoption(option.ini, default=None):
        return True
    raw: Any = config.getini(option.ini)
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise pytest.UsageError(f"{option.ini} = {raw!r} in the ini file: expected true or false (also yes/no, on/off, 1/0)")


def path(config: pytest.Config, name: str) -> Path | None:
    """A path: CLI values are relative to the invocation folder, ini values to the ini file's folder."""
    option = BY_NAME[name]
    cli = config.getoption(option.ini, default=None)
    if cli is not None:
        if not str(cli).strip():
            raise pytest.UsageError(f"{option.flag}= is empty: give a file path")
        return Path(config.invocation_params.dir, cli)
    value = str(config.getini(option.ini) or "").strip()
    if not value:
        return None
    base = config.inipath.parent if config.inipath is not None else config.rootpath
    return Path(base, value)
