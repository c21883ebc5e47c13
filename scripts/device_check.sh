#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a lent CUDA machine (the device tool: 15 minutes a task,
# 10 a command). From the repo root there:   bash scripts/device_check.sh      (timeout_s=600)
#   1. the `gpu` tests (tests/gpu: CUDA kernels, bf16, cached decoding and training of every method)
#   2. bench dnd, bench gateskip, bench dreamer, bench core --compile in bf16, at sizes where a GPU has work to do
# Each step has its own time limit, so one slow step cannot cost the others. Results: $OUT/results.tgz (every
# bench's .md and .json, the test log) and the markdown tables on stdout. The device's python3 runs the source
# tree (PYTHONPATH=src); it has torch, transformers and pytest.
# SMOKE=1 runs the same steps on the CPU at tiny sizes, to check the script itself (about 5 minutes here).
set -uo pipefail
OUT=${OUT:-runs/device}
RES="$OUT/results"
PY=${PYTHON:-python3}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$RES"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RES/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    grep -v '^\s*$' "$RES/$name.log" | grep -E '^(\||###|[0-9]+ (passed|failed)|FAILED|ERROR)' | head -80
    echo "=== $name: exit $rc in $((SECONDS - start))s"
}

if [ "${SMOKE:-0}" = 1 ]; then
    DEV=(--device cpu --dtype bfloat16)
    TESTS=(env DYNDEPTH_TEST_DEVICE=cpu "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -x)
    DND=(--model bench-small --batches 1,4 --prefill-len 64 --new-tokens 4 --repeats 1)
    GATESKIP=(--model bench-small --budgets 0,0.5 --prefill-lens 128 --decode-batches 1,4 --new-tokens 4 --repeats 1)
    DREAMER=(--model dreamer-tiny --batch-size 2 --seq-len 32 --steps 1 --decode-batches 1 --new-tokens 4
             --repeats 1)
    CORE=(--model bench-small --batch-size 1 --prompt-len 64 --decode-batch-size 1 --new-tokens 4 --repeats 1
          --no-compile)
else
    DEV=(--device cuda --dtype bfloat16)
    TESTS=("$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # qwen3-0.6b shapes (random weights): big enough that a step is not all kernel launches
    DND=(--model qwen3-0.6b --batches 1,32,128 --prefill-len 512 --new-tokens 32 --repeats 5)
    GATESKIP=(--model qwen3-0.6b --prefill-lens 512,2048 --decode-batches 1,32,128 --new-tokens 32 --repeats 5)
    DREAMER=(--model dreamer-small --batch-size 16 --seq-len 512 --steps 10 --decode-batches 1,32,128 --repeats 3)
    CORE=(--model qwen3-0.6b --batch-size 8 --prompt-len 512 --decode-batch-size 32 --new-tokens 64 --repeats 5
          --compile)
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step gpu_tests 120 "${TESTS[@]}"
step bench_dnd 90 "$PY" -m dyndepth bench dnd "${DEV[@]}" "${DND[@]}" --out "$RES"
step bench_gateskip 100 "$PY" -m dyndepth bench gateskip "${DEV[@]}" "${GATESKIP[@]}" --out "$RES"
step bench_dreamer 90 "$PY" -m dyndepth bench dreamer "${DEV[@]}" "${DREAMER[@]}" --out "$RES"
step bench_core 150 "$PY" -m dyndepth bench core "${DEV[@]}" "${CORE[@]}" --out "$RES"
tar czf "$OUT/results.tgz" -C "$RES" . && echo "results: $OUT/results.tgz"
