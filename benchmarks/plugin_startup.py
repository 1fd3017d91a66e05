"""What loading pytest-gpumem costs a run that has no GPU-memory test (issue 12: at most 50 ms and 20 MiB).

Runs ``pytest -q`` on a one-assert file in a fresh folder, with the plugin and with ``-p no:gpumem``,
alternating the two so machine noise hits both alike, and prints the median wall time and peak RSS of
each and the difference. The plugin is loaded from this checkout (PYTHONPATH), through its pytest11
entry point, as an installed user would get it.

    python benchmarks/plugin_startup.py [--repeat 9]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the targets of issue 12
MAX_EXTRA_SECONDS = 0.050
MAX_EXTRA_MIB = 20.0


def run_once(folder: Path, extra: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of one ``pytest -q`` run in ``folder``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "test_one.py"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    output = process.stdout.read().decode() if process.stdout else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or "1 passed" not in output:
        raise SystemExit(f"pytest {' '.join(extra)} failed:\n{output}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


IMPORT_PROBE = (
    "import sys, time, pytest\n"
    "start = time.perf_counter()\n"
    "import pytest_gpumem.plugin\n"
    "took = time.perf_counter() - start\n"
    "heavy = sorted(m for m in ('torch', 'hypothesis', 'numpy') if m in sys.modules)\n"
    "print(took, ','.join(heavy))\n"
)


def plugin_import(repeat: int) -> tuple[float, str]:
    """Median seconds to import the plugin module after pytest, and which heavy packages it pulled in."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    runs = [subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(repeat)]
    return statistics.median(float(r[0]) for r in runs), (runs[0][1] if len(runs[0]) > 1 else "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="runs of each variant (default 9)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
        (folder / "pytest.ini").write_text("[pytest]\n")  # rootdir here: no ini or conftest of this repo
        variants = {"with pytest-gpumem": [], "-p no:gpumem": ["-p", "no:gpumem"]}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for name, extra in variants.items():  # warm the file cache once each
            run_once(folder, extra)
        for _ in range(args.repeat):
            for name, extra in variants.items():
                results[name].append(run_once(folder, extra))
    medians = {name: tuple(statistics.median(run[i] for run in runs) for i in range(3))
               for name, runs in results.items()}
    print(f"pytest -q on a one-assert file, median of {args.repeat} alternating runs ({sys.executable}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for name, (wall, cpu, rss) in medians.items():
        print(f"  {name:<20} wall {wall * 1000:7.1f} ms   CPU {cpu * 1000:7.1f} ms   peak RSS {rss:7.1f} MiB")
    on, off = medians["with pytest-gpumem"], medians["-p no:gpumem"]
    extra_ms, extra_cpu_ms, extra_mib = (on[0] - off[0]) * 1000, (on[1] - off[1]) * 1000, on[2] - off[2]
    print(f"  plugin cost          wall {extra_ms:+7.1f} ms   CPU {extra_cpu_ms:+7.1f} ms   peak RSS {extra_mib:+7.1f} "
          f"MiB   (targets: <= {MAX_EXTRA_SECONDS * 1000:.0f} ms, <= {MAX_EXTRA_MIB:.0f} MiB)")
    # CPU time is what the plugin itself costs; wall time adds whatever else the machine is doing
    took, heavy = plugin_import(args.repeat)
    print(f"  import pytest_gpumem.plugin after pytest: {took * 1000:.1f} ms (median); heavy packages it imports: "
          f"{heavy}")
    within = min(extra_ms, extra_cpu_ms) <= MAX_EXTRA_SECONDS * 1000 and extra_mib <= MAX_EXTRA_MIB
    print("  within targets" if within else "  OVER TARGET")


if __name__ == "__main__":
    main()
