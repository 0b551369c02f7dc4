#!/usr/bin/env bash
# Every GPU measurement of issue #16 in one command: for a session lent a GPU, whose device
# time (15 min in all, a machine's start included) allows one prepared call. Each step runs
# under its own time limit; one that fails or runs out is logged and the next one runs.
#
#   bash bench/gpu_prepare.sh                  # here, once: .whl/ and .data/ (git-ignored)
#   device run, carry [".whl", ".data"], timeout_s 600:
#       bash bench/gpu_session.sh              # ~8 min on an H100/H200; results in $OUT
#   DEVICE=cpu QUICK=1 bash bench/gpu_session.sh /tmp/gs   # the same steps, tiny, on a CPU
#   (BUDGET_S=540: the steps' seconds together; PYTHON=python3: the interpreter)
#
# Results: three files in $OUT (what the device tool brings back; 8 files at most, so the
# training figures go to FIGURES=/tmp/gpu_session_figures): session.log (each step's
# command, exit status and time, and the failed steps), steps.log (their output, one
# section each) and bench.jsonl (each benchmark's BENCH_JSON record). The numbers go to
# docs/scaling.md and docs/nn.md with the date, the device and the versions session.log names.
set -uo pipefail
shopt -s nullglob
DIR=$(realpath -m "${1:-${OUT:-bench_out/gpu_session}}")  # relative to the caller's folder
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(realpath -s "$PY")  # absolute, the venv link kept
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD  # tests and checks run from /tmp, so they import the installed enkal, not ./enkal
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-540}  # all steps together: the device call's limit is 600 s
deadline=$((SECONDS + BUDGET_S))
mkdir -p "$DIR"
: > "$DIR/session.log"; : > "$DIR/steps.log"; : > "$DIR/bench.jsonl"
export PYTHONUNBUFFERED=1

log() { echo "[gpu_session $(date -u +%H:%M:%S)] $*" | tee -a "$DIR/session.log"; }
failed=()

step() {  # step NAME LIMIT_S COMMAND... (the limit cut to what is left of BUDGET_S)
    local name=$1 limit=$2 t0=$SECONDS rc left=$((deadline - SECONDS))
    shift 2
    if [ "$left" -lt 15 ]; then log "$name: skipped, ${left} s of the budget left"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name: $(echo "$*" | head -n 1 | cut -c 1-200) (limit ${limit} s)"
    echo "===== $name: $*" >> "$DIR/steps.log"
    timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.tmp" 2>&1
    rc=$?
    cat "$DIR/$name.tmp" >> "$DIR/steps.log"
    grep '^BENCH_JSON ' "$DIR/$name.tmp" | sed 's/^BENCH_JSON //' >> "$DIR/bench.jsonl"
    rm -f "$DIR/$name.tmp"
    [ "$rc" = 0 ] || failed+=("$name")
    log "$name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit)') after \
$((SECONDS - t0)) s"
}

# -- set-up: enkal from this tree (no dependencies fetched), the data where enkal looks ---
if ! env -C /tmp "$PY" -c "import enkal" > /dev/null 2>&1; then
    rm -rf /tmp/enkal_site  # a rerun on a warm machine installs this tree, not the last one
    step install 180 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation \
        --target /tmp/enkal_site .whl/*.whl .
    export PYTHONPATH=/tmp/enkal_site${PYTHONPATH:+:$PYTHONPATH}
fi
FASHION=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION" ] && [ -d .data/fashion-mnist ]; then
    { mkdir -p "$(dirname "$FASHION")" && cp -r .data/fashion-mnist "$FASHION"; } ||
        log "could not copy .data/fashion-mnist to $FASHION: the Fashion steps will fail"
fi
step environment 60 env -C /tmp "$PY" -c "
import os, platform, subprocess, torch, enkal
print('enkal', enkal.__version__, 'from', os.path.dirname(enkal.__file__), 'torch', torch.__version__,
      'python', platform.python_version())
print('device', '$DEVICE', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')
print('fashion-mnist', os.path.isdir('$FASHION'))
if torch.cuda.is_available():
    print(subprocess.run(['nvidia-smi'], capture_output=True, text=True).stdout)
"

# -- the steps, most wanted first ----------------------------------------------------------
# One command per step; QUICK appends overrides (argparse keeps the last value), so the full
# flags are parsed on the CPU too (tests/test_bench_gpu_session.py).
FIGURES=${FIGURES:-/tmp/gpu_session_figures}  # not in $OUT: the device returns 8 files at most
tests=("$ROOT/tests") q_update=() q_profile=() q_forward=() q_train=()
if [ "$QUICK" = 1 ]; then
    tests=("$ROOT/tests/test_update.py") q_update=(--quick --P 1e4 --M 100)
    q_profile=(--P 1e4 --repeats 2) q_forward=(--quick --repeats 1)
    q_train=(--quick --ensemble 16 --seeds 0)
fi
step gpu_tests 120 env -C /tmp "$PY" -m pytest -q -m gpu -p no:cacheprovider "${tests[@]}"
step update 150 "$PY" bench/update.py --device "$DEVICE" --dtypes float32 bfloat16 \
    --P 1e6 1e7 1e8 --M 2000 --no-alloc --no-peer "${q_update[@]}"
step update_profile 60 "$PY" bench/update_profile.py --device "$DEVICE" --P 1e5 1e6 \
    "${q_profile[@]}"
step forward 90 "$PY" bench/forward.py --device "$DEVICE" "${q_forward[@]}"
for seeds in 0 "1 2"; do  # a record per part: a time limit loses one part only
    # shellcheck disable=SC2086
    step "training_seeds_${seeds// /_}" 150 "$PY" bench/nn_training.py --device "$DEVICE" \
        --problem fashion --methods adamw,enkal --ensemble 1024 --seeds $seeds --threads 0 \
        --out "$FIGURES" "${q_train[@]}"
done
step training_e64 60 "$PY" bench/nn_training.py --device "$DEVICE" --problem fashion \
    --methods enkal --ensemble 64 --seeds 0 --threads 0 --out "$FIGURES" "${q_train[@]}"
step training_bf16 90 "$PY" bench/nn_training.py --device "$DEVICE" --problem fashion \
    --methods enkal --ensemble 1024 --seeds 0 --dtype bfloat16 --forward-dtype bfloat16 \
    --threads 0 --out "$FIGURES" "${q_train[@]}"
log "done: $(grep -c . "$DIR/bench.jsonl") benchmark record(s) in $DIR/bench.jsonl; \
failed: ${failed[*]:-none}"
