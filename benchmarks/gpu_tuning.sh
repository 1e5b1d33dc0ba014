#!/usr/bin/env bash
# The speed levers not yet measured on a GPU, each in its own time box (about 8 minutes in all):
#   bash benchmarks/gpu_tuning.sh [OUT]
# 1. training at batch 1,024 with torch.compile (default mode);
# 2. training and sampling with DDPM_COMPILE_MODE=max-autotune-no-cudagraphs (the sampler keeps its
#    own CUDA graphs), against the default mode in the same run.
# Each trial writes OUT/NAME.json and prints its table; a trial that runs out of time says so.
set -u
. "$(dirname "$0")/gpu_env.sh"
trial() {  # NAME SECONDS ENV... -- BENCH-ARGS...
  local name=$1 limit=$2; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "== $name"
  if env "${envs[@]}" timeout "$limit" python3 -m ddpm_cli bench --model-size ddpm-cifar10 --compile --rounds 1 --format json "$@" \
      > "$out/$name.json" 2> "$out/$name.log"; then
    python3 -c "import json, sys; from ddpm_cli.cli.bench import table; print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
  else
    echo "$name: stopped (rc $?) after ${limit} s; see $out/$name.log"; tail -2 "$out/$name.log"
  fi
}
trial train-1024 180 DDPM_COMPILE_MODE= -- --only train --train-batch 1024 --train-steps 20
trial autotune 280 DDPM_COMPILE_MODE=max-autotune-no-cudagraphs -- --train-batch 512 --train-steps 20 \
  --sample-batch 1024 --sample-steps 10
