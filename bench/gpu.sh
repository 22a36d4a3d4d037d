#!/usr/bin/env bash
# The benchmarks on one GPU, bfloat16, at pi0's real sizes: about 5-6 minutes on an H100.
# Results (JSON) and logs go to $OUT when it is set, else to outputs/bench/gpu/.
#
#   bash bench/gpu.sh
#   PRESET=small bash bench/gpu.sh                 # a GPU with less than ~48 GB
#   PYTHON=/path/to/venv/bin/python bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
PRESET=${PRESET:-full}
OUT_DIR=${OUT:-outputs/bench/gpu}
mkdir -p "$OUT_DIR"
COMMON=(--device cuda --dtype bfloat16 --preset "$PRESET")

run() {  # run SCRIPT [its options]: output to the terminal and to $OUT_DIR/SCRIPT.log
    local script=$1
    shift
    echo "=== $(date +%T) $script ($PRESET preset) ==="
    "$PYTHON" "bench/$script.py" "${COMMON[@]}" "$@" --out "$OUT_DIR/$script.json" 2>&1 | tee "$OUT_DIR/$script.log"
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
# The cached Euler step eager and compiled (reduce-overhead: replayed as a CUDA graph), pi0 in the same run.
run latency --warmup 3 --reps 20 --profile --compile-modes reduce-overhead
# The deployment target: a full-preset chunk, batch 1, bf16, CUDA graph, in at most 60 ms.
"$PYTHON" - "$OUT_DIR/latency.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
for name in ("ours compile_mode=reduce-overhead", "ours use_cache=true", "pi0"):
    if name in results:
        print(f"{name}: median {results[name]['median'] * 1000:.1f} ms per chunk")
graph_ms = results["ours compile_mode=reduce-overhead"]["median"] * 1000
print(f"CUDA-graph chunk {graph_ms:.1f} ms against the 60 ms target:", "MET" if graph_ms <= 60 else "MISSED")
PY
# Inference peak memory: built to act, loaded from a checkpoint (the load's own peak too), float32
# masters, pi0's bf16 mode.
run memory --chunks 3
# Both full-size policies training at once would not fit one 80 GB GPU: one after the other.
run throughput --batch-size 8 --warmup 2 --steps 8 --sequential
run roofline --warmup 2 --reps 10
run checkpointing --batch-size 8 --warmup 2 --steps 4
echo "=== $(date +%T) done: results in $OUT_DIR ==="
