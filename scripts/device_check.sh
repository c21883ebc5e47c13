#!/usr/bin/env bash
# The checks that need a GPU, prepared for a lent CUDA machine (the device tool: 15 minutes of device time a
# task, 10 a command, at most 8 files back). Three commands from the repo root there, each well under 10 minutes:
#   PART=a bash scripts/device_check.sh   # gpu tests (tests/gpu), bench dnd, bench gateskip, bench dreamer
#   PART=b bash scripts/device_check.sh   # bench core --compile (compiles ours and HF), the compiled-training test
#   PART=c bash scripts/device_check.sh   # bench gateskip --compile and bench dnd --compile (decode as one graph)
# Each step runs under its own time limit, so one slow step cannot cost the others; after every step the
# results so far are packed into $OUT/results-$PART.tgz (each bench's .md and .json, each step's log), and the
# tables go to stdout. The device's python3 runs the source tree (PYTHONPATH=src); it has torch, transformers,
# pytest and pytest-timeout.
# SMOKE=1 runs the same steps on the CPU at tiny sizes, to check the script itself (about 5 minutes here).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1  # the repo root: PYTHONPATH=src and the test paths are relative to it
PART=${PART:-a}
OUT=${OUT:-runs/device}
RES=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RES/NAME.log, never stop the script
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    grep -E '^(\||###|[0-9]+ (passed|failed)|FAILED|ERROR|PASSED)' "$RES/$name.log" | head -80
    if [ "$rc" != 0 ]; then  # a failed or timed-out step: its last lines here, the whole log in the archive
        echo "--- $name: last lines of its log"
        tail -n 25 "$RES/$name.log"
    fi
    echo "=== $name: exit $rc in $((SECONDS - start))s"
    tar czf "$OUT/results-$PART.tgz" -C "$RES" .
}

SCALE=1
if [ "${SMOKE:-0}" = 1 ]; then
    SCALE=3  # this CPU is slower than the limits assume
    DEV=(--device cpu --dtype bfloat16)
    PYTEST=(env DYNDEPTH_TEST_DEVICE=cpu "$PY" -m pytest -p no:cacheprovider -rA -q)
    PYTEST_COMPILE=("${PYTEST[@]}")
    DND=(--model bench-small --batches 1,4 --prefill-len 64 --new-tokens 4 --repeats 1)
    GATESKIP=(--model bench-small --budgets 0,0.5 --prefill-lens 128 --decode-batches 1,4 --new-tokens 4 --repeats 1)
    DREAMER=(--model dreamer-tiny --batch-size 2 --seq-len 32 --steps 1 --decode-batches 1 --new-tokens 4
             --repeats 1)
    CORE=(--model bench-small --batch-size 1 --prompt-len 64 --decode-batch-size 1 --new-tokens 4 --repeats 1
          --no-compile)
    GATESKIP_C=(--model tiny-qwen3 --budgets 0,0.5 --prefill-lens 32 --decode-batches 1,4 --new-tokens 4 --repeats 1)
    DND_C=(--model tiny-qwen3 --batches 1,4 --prefill-len 32 --new-tokens 4 --repeats 1)
else
    DEV=(--device cuda --dtype bfloat16)
    PYTEST=("$PY" -m pytest -p no:cacheprovider -rA -q --timeout=100)
    # the compiled-training test compiles its layers' graphs (forward, backward, recompiles as routed counts vary)
    # on first use: 90 s on this CPU; a per-test limit just under its step's 150 s (the later --timeout wins)
    PYTEST_COMPILE=("${PYTEST[@]}" --timeout=140)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # qwen3-0.6b shapes (random weights): big enough that a step is not all kernel launches
    DND=(--model qwen3-0.6b --batches 1,32,64 --prefill-len 512 --new-tokens 16 --repeats 3)
    GATESKIP=(--model qwen3-0.6b --prefill-lens 512,2048 --decode-batches 1,32,64 --new-tokens 16 --repeats 3)
    DREAMER=(--model dreamer-small --batch-size 16 --seq-len 512 --steps 8 --decode-batches 1,32,64 --repeats 3)
    # --no-load-memory: load memory is peak RSS of CPU loads in fresh processes, the same on any machine (the CPU
    # runs measure it); its two 0.6B loads would take time from the four compiles this step's 300 s must hold
    CORE=(--model qwen3-0.6b --batch-size 8 --prompt-len 512 --decode-batch-size 32 --new-tokens 32 --repeats 3
          --compile --no-load-memory)
    # compiled decode steps (CUDA graphs): each budget / contender, batch size and ledger state compiles once
    GATESKIP_C=(--model qwen3-0.6b --budgets 0,0.3 --prefill-lens 512 --decode-batches 1,32 --new-tokens 16 --repeats 3)
    DND_C=(--model qwen3-0.6b --batches 1,32 --prefill-len 512 --new-tokens 16 --repeats 3)
fi
echo "part $PART, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$PART" = a ]; then
    step gpu_tests 110 "${PYTEST[@]}" -m "gpu or not gpu" tests/gpu tests/core/test_layers.py -k "not gateskip_compiled"
    step bench_dnd 80 "$PY" -m dyndepth bench dnd "${DEV[@]}" "${DND[@]}" --out "$RES"
    step bench_gateskip 100 "$PY" -m dyndepth bench gateskip "${DEV[@]}" "${GATESKIP[@]}" --out "$RES"
    step bench_dreamer 80 "$PY" -m dyndepth bench dreamer "${DEV[@]}" "${DREAMER[@]}" --out "$RES"
elif [ "$PART" = c ]; then
    step bench_gateskip_compiled 280 "$PY" -m dyndepth bench gateskip "${DEV[@]}" "${GATESKIP_C[@]}" --compile \
        --out "$RES"
    step bench_dnd_compiled 280 "$PY" -m dyndepth bench dnd "${DEV[@]}" "${DND_C[@]}" --compile --out "$RES"
else
    step gpu_compile 150 "${PYTEST_COMPILE[@]}" -m gpu tests/gpu -k gateskip_compiled
    step bench_core 300 "$PY" -m dyndepth bench core "${DEV[@]}" "${CORE[@]}" --out "$RES"
fi
echo "results: $OUT/results-$PART.tgz"
