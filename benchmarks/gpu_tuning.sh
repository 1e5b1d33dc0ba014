#!/usr/bin/env bash
# The speed levers not yet settled on a GPU, each trial in its own time box (8 minutes at most):
#   bash benchmarks/gpu_tuning.sh [OUT]
# 1. sampling at batch 1,024, compiled, contiguous against channels-last, side by side in one process;
# 2. sampling compiled with torch.compile's default mode against max-autotune-no-cudagraphs (the
#    sampler keeps its own CUDA graphs), side by side;
# 3. training at batch 1,024 with torch.compile (default mode).
# Each trial writes OUT/NAME.json and prints its table; one that runs out of time says so, and its
# log (OUT/NAME.log) still holds the variants it finished.
set -u
. "$(dirname "$0")/gpu_env.sh"
trial() {  # NAME SECONDS BENCH-ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if timeout "$limit" python3 -m ddpm_cli bench --model-size ddpm-cifar10 --compile --format json "$@" \
      > "$out/$name.json" 2> "$out/$name.log"; then
    python3 -c "import json, sys; from ddpm_cli.cli.bench import table; print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
  else
    echo "$name: stopped (rc $?) after ${limit} s; see $out/$name.log"; grep "ddpm: bench " "$out/$name.log" | tail -4
  fi
}
trial sample-layouts 180 --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --layouts contiguous,channels_last
trial sample-autotune 180 --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --compile-modes default,max-autotune-no-cudagraphs
trial train-1024 120 --only train --train-batch 1024 --train-steps 10 --rounds 1
