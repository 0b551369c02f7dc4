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
# Results (three files, what the device tool brings back from $OUT): session.log (each
# step's command, exit status and time), steps.log (their output, one section each) and
# bench.jsonl (each benchmark's BENCH_JSON record). The numbers go to docs/scaling.md and
# docs/nn.md with the date, the device and the versions session.log names.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD  # the tests run from /tmp, so that they import the installed enkal, not ./enkal
DIR=${1:-${OUT:-bench_out/gpu_session}}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}  # all steps together: the device call's limit is 600 s
deadline=$((SECONDS + BUDGET_S))
mkdir -p "$DIR"
: > "$DIR/session.log"; : > "$DIR/steps.log"; : > "$DIR/bench.jsonl"
export PYTHONUNBUFFERED=1

log() { echo "[gpu_session $(date -u +%H:%M:%S)] $*" | tee -a "$DIR/session.log"; }

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
    log "$name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') after $((SECONDS - t0)) s"
}

# -- set-up: enkal from this tree (no dependencies fetched), the data where enkal looks ---
if ! "$PY" -c "import enkal" > /dev/null 2>&1; then
    wheels=(); [ -d .whl ] && wheels=(.whl/*.whl)
    step install 180 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation \
        --target /tmp/enkal_site "${wheels[@]}" .
    export PYTHONPATH=/tmp/enkal_site${PYTHONPATH:+:$PYTHONPATH}
fi
FASHION=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION" ] && [ -d .data/fashion-mnist ]; then
    mkdir -p "$(dirname "$FASHION")" && cp -r .data/fashion-mnist "$FASHION"
fi
step environment 60 "$PY" -c "
import os, platform, subprocess, torch, enkal
print('enkal', enkal.__version__, 'torch', torch.__version__, 'python', platform.python_version())
print('device', '$DEVICE', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')
print('fashion-mnist', os.path.isdir('$FASHION'))
if torch.cuda.is_available():
    print(subprocess.run(['nvidia-smi'], capture_output=True, text=True).stdout)
"

# -- the steps, most wanted first ---------------------------------------------------------
if [ "$QUICK" = 1 ]; then
    step gpu_tests 120 env -C /tmp "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        "$ROOT/tests/test_update.py"
    step update 120 "$PY" bench/update.py --device "$DEVICE" --quick --dtypes float32 bfloat16 \
        --no-alloc --no-peer
    step update_profile 60 "$PY" bench/update_profile.py --device "$DEVICE" --P 1e4 --repeats 2
    step forward 60 "$PY" bench/forward.py --device "$DEVICE" --quick --repeats 1
    step training 120 "$PY" bench/nn_training.py --device "$DEVICE" --quick --methods adamw,enkal \
        --out "$DIR/training"
    step training_bf16 120 "$PY" bench/nn_training.py --device "$DEVICE" --quick --methods enkal \
        --dtype bfloat16 --forward-dtype bfloat16 --out "$DIR/training"
else
    step gpu_tests 120 env -C /tmp "$PY" -m pytest -q -m gpu -p no:cacheprovider "$ROOT/tests"
    step update 150 "$PY" bench/update.py --device "$DEVICE" --dtypes float32 bfloat16 \
        --P 1e6 1e7 1e8 --M 2000 --no-alloc --no-peer
    step update_profile 60 "$PY" bench/update_profile.py --device "$DEVICE" --P 1e5 1e6
    step forward 90 "$PY" bench/forward.py --device "$DEVICE"
    step training 200 "$PY" bench/nn_training.py --device "$DEVICE" --problem fashion \
        --methods adamw,enkal --ensemble 1024 --threads 0 --out "$DIR/training"
    step training_e64 60 "$PY" bench/nn_training.py --device "$DEVICE" --problem fashion \
        --methods enkal --ensemble 64 --seeds 0 --threads 0 --out "$DIR/training"
    step training_bf16 90 "$PY" bench/nn_training.py --device "$DEVICE" --problem fashion \
        --methods enkal --ensemble 1024 --seeds 0 --dtype bfloat16 --forward-dtype bfloat16 \
        --threads 0 --out "$DIR/training"
fi
log "done: $(grep -c . "$DIR/bench.jsonl") benchmark record(s) in $DIR/bench.jsonl"
