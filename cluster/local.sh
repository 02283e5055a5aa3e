#!/usr/bin/env bash
# Single-machine launcher: one torchrun process per GPU, or 2 gloo CPU ranks without GPUs.
#
#   cluster/local.sh CONFIG [torchrun args...] [-- train args...]
#
#   cluster/local.sh configs/demo.toml
#   cluster/local.sh configs/ms1mv3_r100.toml --max-restarts=3 -- --set train.resume=auto
#   NPROC=4 cluster/local.sh configs/demo.toml -- --set train.max_steps=20
#
# Arguments before "--" go to torchrun (they come after the defaults, so e.g. an explicit
# --nproc_per_node wins); arguments after "--" go to `python -m partialfc.train`.
# Environment: NPROC (ranks; default: GPU count, or 2 on CPU), PYTHON (interpreter; default:
# the project's .venv/bin/python when it exists, as `make demo` creates it, else python3).
set -euo pipefail

usage() { sed -n '2,14s/^# \{0,1\}//p' "$0"; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "cluster/local.sh: config file '$CONFIG' does not exist" >&2
    exit 2
fi

TORCHRUN_ARGS=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
    TORCHRUN_ARGS+=("$1")
    shift
done
[[ $# -gt 0 ]] && shift  # drop "--"
TRAIN_ARGS=("$@")

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    # The venv `make demo` / `make install` built: torch is there, not in the system python3.
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
    echo "cluster/local.sh: '$PYTHON' cannot import torch; run 'make install' (creates $REPO/.venv)" \
         "or set PYTHON to an interpreter with partialfc installed" >&2
    exit 2
fi

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(count_gpus)
    [[ "$NPROC" -gt 0 ]] || NPROC=2
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "cluster/local.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi

# Torch's intra-op threads: split the cores between the ranks instead of oversubscribing.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    CORES=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${TORCHRUN_ARGS[@]}" \
    -m partialfc.train "$CONFIG" "${TRAIN_ARGS[@]}"
