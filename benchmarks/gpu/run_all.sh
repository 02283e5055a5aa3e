#!/usr/bin/env bash
# Issue 15's GPU checks in one run: set up, CUDA tests, kernel and head benchmarks, summary.
#
#   PARTIALFC_COMMIT=<short hash> bash benchmarks/gpu/run_all.sh OUT_DIR          # on a CUDA machine
#   PARTIALFC_COMMIT=<short hash> bash benchmarks/gpu/run_all.sh OUT_DIR --train  # issue 16 instead
#   bash benchmarks/gpu/run_all.sh OUT_DIR --cpu-smoke                            # tiny, on CPU
#
# --train runs only the set-up and issue 16's trainer-vs-ceiling benchmark (benchmarks/train.py
# --device cuda: iresnet50/100 x (1 M classes r 0.1, 0.1 M r 1), ~2 min expected, limit 200 s)
# into OUT_DIR/train.log and OUT_DIR/train_gpu.md: a second run when the device time allows.
#
# For a machine with torch (and triton) preinstalled and no network. Every step runs
# under its own time limit and a failing step never stops the next; OUT_DIR receives six
# files: setup.log, tests.log, kernel.log, head.log, kernel.json and gpu.md (the summary:
# versions, step table, test verdict, the kernel bars, both benchmark tables). The
# limits add up to 7.4 minutes (40 + 60 + 80 + 75 + 30 + 80 + 80 s); expected on one
# H200: setup ~20 s, tests ~40 s + ~70 s (Triton's tiles compiling), kernel benchmarks
# ~50 + 20 s + ~70 s (Triton's autotuner compiling), head benchmark ~50 s: about 5.5 min. PARTIALFC_COMMIT names the commit
# when the tree was copied without its .git (else git's, +dirty for local changes).
set -u

usage() { echo "usage: bash benchmarks/gpu/run_all.sh OUT_DIR [--cpu-smoke | --train]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
MODE=gpu
if [ $# -eq 2 ]; then
    case "$2" in
        --cpu-smoke) MODE=cpu-smoke ;;
        --train) MODE=train ;;
        *) usage ;;
    esac
fi
COMMAND="bash benchmarks/gpu/run_all.sh $*"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pfc_gpu.XXXXXX")
STATUS=$WORK/status.tsv
: >"$STATUS"
export PYTHONUNBUFFERED=1
START=$(date +%s)
cd "$REPO" || exit 2

# step NAME LIMIT_S LOG COMMAND...: run under a time limit, append to LOG, record the exit code.
step() {
    local name=$1 limit=$2 log=$3 begin rc
    shift 3
    begin=$(date +%s)
    echo "== $name (limit ${limit} s): $*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - begin))" "$*" >>"$STATUS"
    echo "== $name: exit $rc after $(($(date +%s) - begin)) s" | tee -a "$log"
}

# ------------------------------------------------------------------ 1. setup
SETUP=$OUT/setup.log
: >"$SETUP"
importable() {
    "$PY" -c "import os, partialfc.kernels as k; assert os.path.realpath(k.__file__).startswith(os.path.realpath('$REPO'))" \
        >>"$SETUP" 2>&1
}
if importable; then
    echo "partialfc.kernels already imports from $REPO" >>"$SETUP"
else
    step install 40 "$SETUP" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO"
    if ! importable; then
        # The package maps kernels/ to partialfc.kernels; without the install, a path shim in
        # WORK does the same (the checkout itself gets no symlink).
        SHIM=$WORK/path
        mkdir -p "$SHIM/partialfc"
        for entry in "$REPO"/partialfc/*; do ln -s "$entry" "$SHIM/partialfc/"; done
        ln -s "$REPO/kernels" "$SHIM/partialfc/kernels"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "editable install not importable; PYTHONPATH shim at $SHIM" >>"$SETUP"
        importable || echo "partialfc.kernels still does not import: the steps below will fail" >>"$SETUP"
    fi
fi
"$PY" - >"$WORK/versions.md" 2>>"$SETUP" <<'EOF'
import platform
import torch
try:
    import triton
    triton_version = triton.__version__
except Exception as error:  # report, do not stop
    triton_version = f"not importable ({error})"
print(f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- Device: {torch.cuda.get_device_name(0)}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}")
else:
    print("- Device: no CUDA device visible")
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -1)" \
        >>"$WORK/versions.md"
fi
cat "$WORK/versions.md" >>"$SETUP"

# ------------------------------------------------------------------ 2-4. tests and benchmarks
if [ "$MODE" = train ]; then
    step train 200 "$OUT/train.log" "$PY" benchmarks/train.py --device cuda --out "$OUT/train_gpu.md"
    cat "$WORK/versions.md" >>"$OUT/train_gpu.md"
    rm -rf "$WORK"
    echo "done in $(($(date +%s) - START)) s; report: $OUT/train_gpu.md"
    exit 0
fi
if [ "$MODE" = gpu ]; then
    unset TRITON_INTERPRET
    # The Triton kernel's tests and benchmark run apart and last: compiling its tiles is most
    # of their time, and a time limit should cut them, not the rest.
    PYTEST_ARGS=(-m cuda tests/kernels/test_cuda.py -v -rfEs --timeout 60 -p no:cacheprovider --durations 10)
    step tests 60 "$OUT/tests.log" env TRITON_INTERPRET=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" -k "not triton"
    step tests-triton 80 "$OUT/tests.log" env TRITON_INTERPRET=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" -k triton
    KERNEL_ARGS=(--device cuda --dtype bfloat16 --batch 1024 --dim 512 --subcenters 1 3 --sample-rate 1.0
                 --repeats 5 --warmup 2 --timeout 80 --out "$WORK/kernel.md" --json "$OUT/kernel.json")
    step kernel 75 "$OUT/kernel.log" "$PY" benchmarks/kernel.py "${KERNEL_ARGS[@]}" \
        --impls gemm naive torch gemm:compute --classes 1e6
    step kernel-1e5 30 "$OUT/kernel.log" "$PY" benchmarks/kernel.py "${KERNEL_ARGS[@]}" --append \
        --impls gemm naive --classes 1e5
    step kernel-triton 80 "$OUT/kernel.log" "$PY" benchmarks/kernel.py "${KERNEL_ARGS[@]}" --append \
        --impls triton --classes 1e6
    step head 80 "$OUT/head.log" "$PY" benchmarks/head.py --device cuda --world-size 1 --batch 1024 --dim 512 \
        --classes 1e6 --subcenters 1 --rates 1.0 0.1 --ours-impl gemm --compute-dtype bfloat16 \
        --warmup 2 --steps 5 --large-warmup 2 --large-steps 5 --timeout 40 --out "$WORK/head.md"
else
    # Same steps, CPU-sized: the CUDA tests must skip with their reason, the benchmarks must
    # run end to end (gemm under the Triton interpreter) and the summary must be written.
    export TRITON_INTERPRET=1
    step tests 120 "$OUT/tests.log" "$PY" -m pytest -m cuda tests/kernels/test_cuda.py -q -rs -p no:cacheprovider
    KERNEL_ARGS=(--device cpu --batch 8 --dim 16 --subcenters 1 3 --repeats 1 --threads 1
                 --out "$WORK/kernel.md" --json "$OUT/kernel.json")
    step kernel 240 "$OUT/kernel.log" "$PY" benchmarks/kernel.py "${KERNEL_ARGS[@]}" --impls gemm torch naive \
        --classes 300
    step kernel-triton 240 "$OUT/kernel.log" "$PY" benchmarks/kernel.py "${KERNEL_ARGS[@]}" --append \
        --impls triton --classes 300
    step head 240 "$OUT/head.log" "$PY" benchmarks/head.py --quick --device cpu --world-size 1 --ours-impl gemm \
        --out "$WORK/head.md"
fi

# ------------------------------------------------------------------ 5. summary
"$PY" benchmarks/gpu/summarize.py --out "$OUT/gpu.md" --status "$STATUS" --versions "$WORK/versions.md" \
    --tests-log "$OUT/tests.log" --kernel-json "$OUT/kernel.json" --kernel-md "$WORK/kernel.md" \
    --head-md "$WORK/head.md" --command "$COMMAND" --elapsed "$(($(date +%s) - START))" >>"$SETUP" 2>&1 \
    || echo "summary failed: see $SETUP" >&2
rm -rf "$WORK"
echo "done in $(($(date +%s) - START)) s; summary: $OUT/gpu.md"
