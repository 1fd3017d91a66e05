#!/usr/bin/env bash
# The suite's wall time with `-n 2`, a base commit against the working tree, back to back in one run.
# Usage: bash benchmarks/suite_walltime.sh [BASE_REF] [PYTHON]   (defaults: main, python3)
# Prints, per side, the load average before and after, pytest's summary line, and wall/user/sys seconds
# (user/sys include the xdist workers and pytester subprocesses). On a shared machine, compare the two
# sides only when the load averages around them are alike.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-main}
python=${2:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/before" "$work/after"
git archive "$base" | tar -x -C "$work/before"
git ls-files -co --exclude-standard -z | tar --null -T - -c | tar -x -C "$work/after"
for side in before after; do
    echo "== $side ($([ "$side" = before ] && echo "$base" || echo "working tree")), load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$work/$side" && /usr/bin/time -f "$side: wall %e s, user %U s, sys %S s" env PYTHONPATH="$work/$side" \
        "$python" -m pytest tests -n 2 -q -p no:cacheprovider 2>&1 | grep -a -E "passed|failed|wall") || true
    echo "== $side done, load $(cut -d' ' -f1-3 /proc/loadavg)"
done
