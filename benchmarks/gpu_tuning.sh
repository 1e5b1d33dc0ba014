#!/usr/bin/env bash
# Why the GPU figures are what they are, and the speed levers not yet settled on a GPU, each trial
# in its own time box (8 minutes at most for the default three):
#   bash benchmarks/gpu_tuning.sh [OUT [TRIAL...]]
# profile          kernel_profile.py, compiled: where a bf16 U-Net evaluation at batch 1,024 and a
#                  training step at batch 512 spend their time, by kind of kernel, with the TFLOP/s
#                  the convolutions reach;
# sample-layouts   sampling at batch 1,024, compiled, contiguous against channels-last, side by side;
# train-1024       training at batch 1,024 with torch.compile (default mode);
# sample-autotune  (by name only) sampling compiled with torch.compile's default mode against
#                  max-autotune-no-cudagraphs (the sampler keeps its own CUDA graphs), side by side.
# Each trial writes OUT/NAME.json and prints its table; one that runs out of time says so, and its
# log (OUT/NAME.log) still holds what it finished.
set -u
. "$(dirname "$0")/gpu_env.sh"
shift $(( $# > 0 ? 1 : 0 ))
trials=${*:-profile sample-layouts train-1024}
chosen() { case " $trials " in *" $1 "*) echo "== $1" ;; *) return 1 ;; esac; }
trial() {  # NAME SECONDS BENCH-ARGS...
  local name=$1 limit=$2; shift 2
  chosen "$name" || return
  if timeout "$limit" python3 -m ddpm_cli bench --model-size ddpm-cifar10 --compile --format json "$@" \
      > "$out/$name.json" 2> "$out/$name.log"; then
    python3 -c "import json, sys; from ddpm_cli.cli.bench import table; print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
  else
    echo "$name: stopped (rc $?) after ${limit} s; see $out/$name.log"; grep "ddpm: bench " "$out/$name.log" | tail -4
  fi
}
if chosen profile; then
  timeout 180 python3 benchmarks/kernel_profile.py --compile --json "$out/profile.json" > "$out/profile.txt" \
    2> "$out/profile.log"
  rc=$?; cat "$out/profile.txt"; [ $rc = 0 ] || echo "profile: stopped (rc $rc); see $out/profile.log"
fi
trial sample-layouts 180 --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --layouts contiguous,channels_last
trial train-1024 120 --only train --train-batch 1024 --train-steps 10 --rounds 1
trial sample-autotune 180 --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --compile-modes default,max-autotune-no-cudagraphs
