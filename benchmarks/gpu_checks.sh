#!/usr/bin/env bash
# The GPU checks of issues #5 and #9 as one prepared device call (~8 minutes on an H100 / H200):
#   1. the Triton kernels and the model's Triton path against the torch path, compiled on CUDA;
#   2. generation against transformers' generate, Qwen3-0.6B shape, batch 64, bf16 (#5);
#   3. a training step against transformers + PEFT, Qwen3-0.6B at 4k tokens and 1.7B at 8k (#9);
#   4. the longest trainable sequence of each side, Qwen3-0.6B (#9).
# Usage (repository root, on the GPU machine):  OUT=/some/dir bash benchmarks/gpu_checks.sh
# Each step has its own time limit, so one slow step cannot eat the others' time; results (JSON, logs)
# go to $OUT. Record them in BENCHMARKS.md with the device named.
# A dry run of the plumbing on CPU with tiny configs named like the real ones:
#   DEVICE=cpu CONFIGS=/dir/with/tiny/Qwen3-0.6B.json+Qwen3-1.7B.json bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
CONFIGS=${CONFIGS:-data/qwen3-configs}   # the repository's copies (data/SOURCES.md)
[ -f "$CONFIGS/Qwen3-0.6B.json" ] || { echo "no Qwen3-0.6B.json in $CONFIGS"; exit 2; }
MEMCAP=""
[ "$DEVICE" = cpu ] && MEMCAP="--cpu-mem-limit-gb 4"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 6 "$OUT/$name.log"
}

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$OUT/versions.txt"

step kernel_tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_lora.py \
    tests/test_kernels_logprob.py tests/test_kernels_norm_rope.py tests/test_kernels_adamw.py \
    tests/test_model_kernels.py
step generate_0.6b 120 $PY benchmarks/bench_generate.py --model-config "$CONFIGS/Qwen3-0.6B.json" \
    --device "$DEVICE" --batch 64 --prompt-len 64 512 --new-tokens 256 --repeats 1 --out "$OUT/generate_0.6b.json"
step bench_0.6b_4k 90 $PY cli.py bench --model-config "$CONFIGS/Qwen3-0.6B.json" --batch 1 --seq 4096 \
    --steps 6 --device "$DEVICE" --json "$OUT/bench_0.6b_4k.json"
step bench_1.7b_8k 90 $PY cli.py bench --model-config "$CONFIGS/Qwen3-1.7B.json" --batch 1 --seq 8192 \
    --steps 6 --device "$DEVICE" --json "$OUT/bench_1.7b_8k.json"
step max_seq_0.6b 100 $PY cli.py bench --model-config "$CONFIGS/Qwen3-0.6B.json" --batch 1 --seq 8192 \
    --max-seq 131072 --checkpointing on --device "$DEVICE" $MEMCAP --json "$OUT/max_seq_0.6b.json"
