#!/usr/bin/env bash
# The first command of a session lent a GPU (issue 10, item 6): every lent minute becomes committed data.
#
# Through the device tool, from the repository root (the tool sends the session's own checkout: this
# script must be on it), with one call:
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# then, on the development machine, unpack what came back into the worktree and commit it:
#
#     cat <files_at>/gpu_session-*.tar.gz* | tar -xzf - -C <worktree>
#     git add benchmarks/results tests/data/cuda_corpus && git commit -m "GPU session: ..."
#
# Stages, each under `timeout`, none stopping the ones after it, all inside a total budget (default 540 s,
# GPUMEM_SESSION_BUDGET): environment (nvidia-smi, torch/CUDA/cuDNN), editable install
# (pip install --no-deps --no-build-isolation -e .), tests/test_cuda.py with GPUMEM_RECORD_RESULTS=1,
# the CUDA corpus (benchmarks/record_cuda_corpus.py), the accuracy zoo on cuda, the examples on the cuda
# backend with --gpumem-report --gpumem-json, the corpus replay tests; then everything written goes
# into one tarball (repo-relative paths) plus the log, copied to $OUT when the device tool sets it (only
# files under $OUT come back: at most 8, 16 MiB each, so a larger tarball is split in 15 MiB parts).
#
#     bash benchmarks/gpu_session.sh --cpu-dry-run   # here, without a GPU: every stage's plumbing, CUDA-only
#                                                    # work reported "skipped: no GPU", outputs in a scratch dir
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
case "${1:-}" in
    --cpu-dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_session.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
BUDGET=${GPUMEM_SESSION_BUDGET:-540}
RESERVE=25                                  # seconds kept for packing and copying the results
STAMP=$(date -u +%Y%m%d-%H%M%S)
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY == 1 ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_dry.XXXXXX")   # never the repo: no fake CUDA data there
    RESULTS=$WORK/benchmarks/results
    CORPUS=$WORK/tests/data/cuda_corpus
else
    WORK=$ROOT
    RESULTS=$ROOT/benchmarks/results
    CORPUS=$ROOT/tests/data/cuda_corpus
fi
mkdir -p "$RESULTS" "$CORPUS"
LOG=$RESULTS/gpu_session-$STAMP.log
SUMMARY=()
MARK=$(mktemp)   # files newer than this were written by this session

say() { echo "[gpu_session +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_SECONDS COMMAND...: run under timeout within what is left of the budget; never exits
stage() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - RESERVE - (SECONDS - START)))
    if ((left < 15)); then
        SUMMARY+=("$name: skipped: the ${BUDGET}s budget is spent"); say "== $name: skipped (budget spent)"; return
    fi
    ((limit > left)) && limit=$left
    say "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="timed out after ${limit}s"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed (exit $rc)"
    SUMMARY+=("$name: $verdict in $((SECONDS - t0))s")
    say "== $name: $verdict in $((SECONDS - t0))s"
}

skip() { SUMMARY+=("$1: skipped: $2"); say "== $1: skipped: $2"; }

say "pytest-gpumem GPU session $STAMP (dry run: $DRY); budget ${BUDGET}s; log $LOG"

# 1. what machine this is
stage environment 60 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; $PY - <<'EOF'
import os, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print('PYTORCH_CUDA_ALLOC_CONF', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), 'PYTORCH_ALLOC_CONF', os.environ.get('PYTORCH_ALLOC_CONF'))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, 'capability', f'{p.major}.{p.minor}', 'memory', p.total_memory, 'SMs', p.multi_processor_count)
else:
    print('gpu: none (torch.cuda.is_available() is False)')
EOF
$PY -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|transformers|timm|peft|pytest|hypothesis|pluggy|pytest-xdist) ' || true"

GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
say "GPU available: $GPU"

# 2. the package, as the issue asks; a dry run only resolves it (the shared venv here stays untouched)
if [[ $DRY == 1 ]]; then
    stage install 120 "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e .
else
    stage install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(not any(e.name == 'gpumem' for e in m.entry_points(group='pytest11')))" 2>/dev/null; then
    export PYTEST_ADDOPTS="-p pytest_gpumem.plugin ${PYTEST_ADDOPTS:-}"   # plugin not installed: load it by name
    say "pytest11 entry point 'gpumem' missing: loading the plugin with -p pytest_gpumem.plugin"
fi

# 3. the CUDA tests (they write benchmarks/results/cuda_engine_<date>.json themselves on a GPU)
stage cuda_tests 150 env GPUMEM_RECORD_RESULTS=1 "$PY" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider

# 4. the corpus (each configuration in its own process; 4 at once)
if [[ $GPU == 1 ]]; then
    stage corpus 300 "$PY" benchmarks/record_cuda_corpus.py --out "$CORPUS" --jobs 4 --timeout 90 --budget 200
else
    skip corpus_cuda "no GPU"
    stage corpus_cpu_check 200 "$PY" benchmarks/record_cuda_corpus.py --device cpu --out "$CORPUS" --only mlp_sgd --jobs 1
fi

# 5. the accuracy zoo: estimate, emulated and (on a GPU) cuda side by side
if [[ $GPU == 1 ]]; then
    stage accuracy 200 "$PY" benchmarks/accuracy.py --json "$RESULTS/accuracy-cuda-$STAMP.json"
else
    stage accuracy_cpu_check 120 "$PY" benchmarks/accuracy.py --only mnist --json "$RESULTS/accuracy-cpu-$STAMP.json"
fi

# 6. the examples on the cuda backend, with the report and the JSON results; the DDP/FSDP examples are left
#    out: one process on one GPU cannot run ranks (the cuda backend refuses parallel=, by design)
if [[ $GPU == 1 ]]; then
    stage examples 180 "$PY" -m pytest examples --gpumem-backend=cuda --gpumem-report \
        --ignore=examples/test_ddp_budget.py --ignore=examples/test_fsdp_budget.py \
        "--gpumem-json=$RESULTS/examples-cuda-$STAMP.json" -p no:cacheprovider -q
else
    skip examples_cuda "no GPU"
    stage examples_emulated_check 180 "$PY" -m pytest examples/test_mlp_mnist_cifar.py --gpumem-backend=emulated \
        --gpumem-report "--gpumem-json=$RESULTS/examples-emulated-$STAMP.json" -p no:cacheprovider -q
fi

# 7. the replay of what was just recorded (CPU work; prints the emulation's misses), if time is left
stage corpus_replay 120 env "GPUMEM_CUDA_CORPUS=$CORPUS" "$PY" -m pytest tests/test_cuda_corpus_replay.py -q -rs \
    -p no:cacheprovider

# 8. pack what this session wrote, with repo-relative paths, and hand it to the device tool
say "summary:"
for line in "${SUMMARY[@]}"; do say "  $line"; done
cd "$WORK"
mapfile -t FILES < <(find benchmarks/results tests/data/cuda_corpus -type f -newer "$MARK" ! -name "*.tar.gz*" \
                     ! -name "gpu_session-$STAMP.log" 2>/dev/null | sort)
say "files written: ${#FILES[@]}"
printf '  %s\n' "${FILES[@]}" | tee -a "$LOG"
TARBALL=$RESULTS/gpu_session-$STAMP.tar.gz
tar -czf "$TARBALL" "${FILES[@]}" "benchmarks/results/gpu_session-$STAMP.log"
PARTS=("$TARBALL")
if (($(stat -c %s "$TARBALL") > 15 * 1024 * 1024)); then
    split -b 15m -d "$TARBALL" "$TARBALL.part-" && rm "$TARBALL"
    mapfile -t PARTS < <(ls "$TARBALL".part-*)
fi
if [[ -n "${OUT:-}" ]]; then
    cp "${PARTS[@]}" "$LOG" "$OUT"/ && say "copied to \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
else
    say "OUT not set: results stay in $WORK (${PARTS[*]})"
fi
say "done in $((SECONDS - START))s"
rm -f "$MARK"
