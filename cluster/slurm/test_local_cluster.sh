#!/usr/bin/env bash
# End-to-end check of cluster/slurm/train.sbatch on a throw-away one-node SLURM cluster.
#
#   sudo cluster/slurm/test_local_cluster.sh [--preempt]
#
# Installs Debian's slurm-wlm and munge when missing (apt-get update first), writes a
# slurm.conf for this machine into a temp dir, starts a private munged, slurmctld and
# slurmd (all pointed at that dir through SLURM_CONF and a private munge socket, so the
# system's /etc/slurm and /etc/munge are not touched), submits the CPU demo for 20 steps,
# waits for it and checks that it COMPLETED with a falling loss. With --preempt it then
# sends the batch shell SIGUSR1 (as --signal=B:USR1@120 would) to a second job and checks
# the job is requeued, resumes and still completes with every step logged exactly once.
# The daemons are always stopped and the temp dir removed (KEEP_RUN=1 keeps it).
#
# Environment: SLURM_TEMPLATE (default cluster/slurm/slurm-local.conf, shipped), MAX_STEPS (20),
# JOB_TIMEOUT seconds (900), KEEP_RUN. Needs root. Not part of pytest: about 2-4 minutes.
set -euo pipefail

PREEMPT=0
for arg in "$@"; do
    case "$arg" in
        --preempt) PREEMPT=1 ;;
        -h|--help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "test_local_cluster.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TEMPLATE=${SLURM_TEMPLATE:-$REPO/cluster/slurm/slurm-local.conf}
MAX_STEPS=${MAX_STEPS:-20}
JOB_TIMEOUT=${JOB_TIMEOUT:-900}
START_TIME=$(date +%s)

say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START_TIME ))s] $*"; }
fail() { say "FAIL: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "run as root (installs packages and starts the SLURM daemons)"
[[ -f "$TEMPLATE" ]] || fail "slurm.conf template '$TEMPLATE' not found (set SLURM_TEMPLATE)"

# ---------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurm-wlm munge
else
    say "slurm-wlm and munge already installed: $(slurmd -V)"
fi

# ---------------------------------------------------------------- configure
RUN=$(mktemp -d /tmp/partialfc-slurm.XXXXXX)
chmod 755 "$RUN"  # the munge user must reach its socket dir below
mkdir -p "$RUN/state" "$RUN/spool" "$RUN/munge"
MUNGED_PID=
SLURMCTLD_PID=
SLURMD_PID=

stop_pid() {  # stop_pid PID NAME: TERM, wait up to 10 s, then KILL
    local pid=$1 name=$2
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; return 0; }; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $name ($pid)"
}

cleanup() {
    local status=$?
    set +e
    if [[ -n "$SLURMCTLD_PID" ]] && kill -0 "$SLURMCTLD_PID" 2>/dev/null; then
        for job in $(squeue -h -o %i 2>/dev/null); do scancel "$job"; done
        for _ in $(seq 30); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 1; done
    fi
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$SLURMCTLD_PID" slurmctld
    stop_pid "$MUNGED_PID" munged
    if [[ $status -ne 0 ]]; then
        for log in "$RUN"/slurmctld.log "$RUN"/slurmd.log "$RUN"/job-*.out "$RUN"/output*/logs/*.log; do
            [[ -f "$log" ]] && { echo "----- tail $log"; tail -n 40 "$log"; }
        done
    fi
    if [[ "${KEEP_RUN:-0}" == 1 ]]; then say "kept $RUN"; else rm -rf "$RUN"; fi
    say "finished with status $status after $(( $(date +%s) - START_TIME )) s"
}
trap cleanup EXIT

for port in 6817 6818; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is in use: another slurmctld/slurmd runs on this machine; stop it first"
    fi
done

HOST=$(hostname -s)
NODE_SPEC=$(slurmd -C | head -n 1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_SPEC")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_SPEC")
[[ -n "$CPUS" && -n "$MEM" ]] || fail "cannot read CPUs/RealMemory from 'slurmd -C': $NODE_SPEC"
export SLURM_CONF="$RUN/slurm.conf"
grep -v '^#' "$TEMPLATE" | sed -e "s|=HOST\b|=$HOST|g" -e "s|=CPUS\b|=$CPUS|g" -e "s|=MEM\b|=$MEM|g" \
    -e "s|=RUN/|=$RUN/|g" >"$SLURM_CONF"
echo "AuthInfo=socket=$RUN/munge/munge.socket" >>"$SLURM_CONF"
grep -q -E '=(HOST|CPUS|MEM|RUN/)' "$SLURM_CONF" && fail "unreplaced placeholder in $SLURM_CONF"
say "slurm.conf for $HOST ($CPUS CPUs, $MEM MB) in $SLURM_CONF"

# ---------------------------------------------------------------- start daemons
mungekey --create --keyfile="$RUN/munge/munge.key" --force
chown -R munge:munge "$RUN/munge"
chmod 755 "$RUN/munge"  # munged wants its socket dir traversable by all, writable by it only
runuser -u munge -- munged --key-file="$RUN/munge/munge.key" --socket="$RUN/munge/munge.socket" \
    --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" --seed-file="$RUN/munge/munged.seed"
for _ in $(seq 50); do [[ -s "$RUN/munge/munged.pid" ]] && break; sleep 0.1; done
MUNGED_PID=$(cat "$RUN/munge/munged.pid")
munge --socket="$RUN/munge/munge.socket" -n | unmunge --socket="$RUN/munge/munge.socket" >/dev/null \
    || fail "munge round trip failed"
say "munged running ($MUNGED_PID)"

slurmctld -D >"$RUN/slurmctld.out" 2>&1 &
SLURMCTLD_PID=$!
slurmd -D >"$RUN/slurmd.out" 2>&1 &
SLURMD_PID=$!
for _ in $(seq 60); do
    [[ "$(sinfo -h -o %t 2>/dev/null)" == idle ]] && break
    kill -0 "$SLURMCTLD_PID" 2>/dev/null || fail "slurmctld exited: $(tail -n 5 "$RUN/slurmctld.out" "$RUN/slurmctld.log" 2>/dev/null)"
    kill -0 "$SLURMD_PID" 2>/dev/null || fail "slurmd exited: $(tail -n 5 "$RUN/slurmd.out" "$RUN/slurmd.log" 2>/dev/null)"
    sleep 1
done
[[ "$(sinfo -h -o %t)" == idle ]] || fail "node not idle after 60 s: $(sinfo)"
say "cluster up: $(sinfo -h -o '%P %a %D %t %N')"

# ---------------------------------------------------------------- helpers
job_field() {  # job_field JOBID FIELD -> value from scontrol show job
    scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}

wait_for_job() {  # wait_for_job JOBID -> prints final state
    local job=$1 state deadline=$(( $(date +%s) + JOB_TIMEOUT )) last=
    while :; do
        state=$(job_field "$job" JobState)
        [[ "$state" != "$last" ]] && { say "job $job: $state" >&2; last=$state; }
        case "$state" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) echo "$state"; return ;;
        esac
        (( $(date +%s) < deadline )) || { echo "STILL_$state"; return; }
        sleep 2
    done
}

check_losses() {  # check_losses OUTPUT: steps unique and complete, loss fell
    python3 - "$1/metrics.jsonl" "$MAX_STEPS" <<'PY'
import json, sys
path, max_steps = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(path) if line.strip()]
steps = [r["step"] for r in records]
losses = [r["loss"] for r in records]
print(f"{path}: steps {steps}")
print("losses " + " ".join(f"{loss:.3f}" for loss in losses))
if len(set(steps)) != len(steps):
    sys.exit(f"duplicate steps in {path}: {steps}")
if steps != sorted(steps) or not steps or steps[-1] != max_steps:
    sys.exit(f"{path}: expected increasing steps ending at {max_steps}, got {steps}")
if len(losses) < 2 or not losses[-1] < 0.8 * losses[0]:
    sys.exit(f"{path}: loss did not fall: {losses}")
PY
}

submit() {  # submit OUTPUT -> job id
    (cd "$REPO" && GPUS=0 OUTPUT="$1" sbatch --parsable --output="$RUN/job-%j.out" \
        cluster/slurm/train.sbatch configs/demo.toml --set "train.max_steps=$MAX_STEPS")
}

# ---------------------------------------------------------------- the demo job
JOB=$(submit "$RUN/output")
say "submitted job $JOB"
STATE=$(wait_for_job "$JOB")
echo "----- job log $RUN/job-$JOB.out"
cat "$RUN/job-$JOB.out"
[[ "$STATE" == COMPLETED ]] || fail "job $JOB ended $STATE (exit code $(job_field "$JOB" ExitCode))"
check_losses "$RUN/output" || fail "job $JOB: loss check failed"
say "job $JOB COMPLETED with a falling loss"

# ---------------------------------------------------------------- preemption
if [[ $PREEMPT -eq 1 ]]; then
    JOB=$(submit "$RUN/output-preempt")
    say "submitted job $JOB (will be signalled)"
    for _ in $(seq 300); do
        [[ -s "$RUN/output-preempt/metrics.jsonl" ]] && break
        sleep 1
    done
    [[ -s "$RUN/output-preempt/metrics.jsonl" ]] || fail "job $JOB logged no step"
    scancel --batch --signal=USR1 "$JOB"
    say "sent SIGUSR1 to the batch shell of job $JOB"
    for _ in $(seq 120); do
        [[ "$(job_field "$JOB" Restarts)" -ge 1 ]] 2>/dev/null && break
        sleep 1
    done
    [[ "$(job_field "$JOB" Restarts)" -ge 1 ]] || fail "job $JOB was not requeued"
    # slurmctld holds a requeued batch job back for the credential lifetime (~2 min);
    # on this private test cluster let it start early -- but not within the second the old
    # run's credential was revoked: slurmd refuses a credential not newer than its
    # revocation ("Killing non-startable batch job: Job credential revoked", seen once).
    sleep 3
    scontrol update JobId="$JOB" StartTime=now
    say "job $JOB requeued ($(job_field "$JOB" JobState)), start time set to now"
    STATE=$(wait_for_job "$JOB")
    echo "----- job log $RUN/job-$JOB.out"
    cat "$RUN/job-$JOB.out"
    [[ "$STATE" == COMPLETED ]] || fail "requeued job $JOB ended $STATE"
    grep -q "requeueing job $JOB" "$RUN/job-$JOB.out" || fail "job $JOB log does not show the requeue"
    check_losses "$RUN/output-preempt" || fail "job $JOB: steps/loss check failed after requeue"
    say "job $JOB was requeued, resumed and COMPLETED"
fi
say "PASS"
