#!/usr/bin/env bash
# Why the GPU figures are what they are, and the speed levers side by side, each trial in its own
# time box (6 minutes at most for the default two):
#   bash benchmarks/gpu_tuning.sh [OUT [TRIAL...]]
# profile          kernel_profile.py, compiled: where a bf16 U-Net evaluation at batch 1,024 and a
#                  training step at batch 512 spend their time, by kind of kernel (the default
#                  layout: channels-last inside the compiled graphs);
# train-1024       compiled training at batch 1,024;
# train-layout     (by name) compiled training at batch 512: contiguous (torch.compile's own layout
#                  choice, which leaves training graphs NCHW) against compiler_channels_last (the
#                  default); on an H200, 5,348 against 6,119 images/s;
# attention        (by name) sampling at batch 1,024 with each attention kernel pinned: auto, flash,
#                  efficient, math (eager, CUDA graphs); on an H200 auto was fastest;
# profile-train-contiguous (by name) the training profile under torch.compile's own layout;
# sample-layouts   (by name) compiled sampling at batch 1,024, contiguous against channels-last;
# sample-autotune  (by name) compiled sampling, torch.compile's default mode against
#                  max-autotune-no-cudagraphs (the sampler keeps its own CUDA graphs); autotuning
#                  takes more than 4 minutes at batch 1,024 on an H200.
# Each trial writes OUT/NAME.json and prints its table; one that runs out of time says so, and its
# log (OUT/NAME.log) still holds what it finished.
set -u
. "$(dirname "$0")/gpu_env.sh"
shift $(( $# > 0 ? 1 : 0 ))
trials=${*:-profile train-1024}
chosen() { case " $trials " in *" $1 "*) echo "== $1" ;; *) return 1 ;; esac; }
trial() {  # NAME SECONDS BENCH-ARGS...
  local name=$1 limit=$2; shift 2
  chosen "$name" || return
  if timeout "$limit" python3 -m ddpm_cli bench --model-size ddpm-cifar10 --format json "$@" \
      > "$out/$name.json" 2> "$out/$name.log"; then
    python3 -c "import json, sys; from ddpm_cli.cli.bench import table; print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
  else
    echo "$name: stopped (rc $?) after ${limit} s; see $out/$name.log"; grep "ddpm: bench " "$out/$name.log" | tail -4
  fi
}
profile() {  # NAME KERNEL_PROFILE-ARGS...
  local name=$1; shift
  chosen "$name" || return
  timeout 180 python3 benchmarks/kernel_profile.py --compile --json "$out/$name.json" "$@" > "$out/$name.txt" \
    2> "$out/$name.log"
  local rc=$?; cat "$out/$name.txt"; [ $rc = 0 ] || echo "$name: stopped (rc $rc); see $out/$name.log"
}
trial train-layout 300 --compile --only train --train-batch 512 --train-steps 10 --rounds 3 \
  --layouts contiguous,compiler_channels_last
trial attention 180 --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --attention-backends auto,flash,efficient,math
profile profile
profile profile-train-contiguous --only train --layout contiguous
trial sample-layouts 180 --compile --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --layouts contiguous,channels_last
trial train-1024 180 --compile --only train --train-batch 1024 --train-steps 10 --rounds 1
trial sample-autotune 540 --compile --only sample --sample-batch 1024 --sample-steps 10 --rounds 3 \
  --compile-modes default,max-autotune-no-cudagraphs
