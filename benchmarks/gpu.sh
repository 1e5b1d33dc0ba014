#!/usr/bin/env bash
# The GPU check of `ddpm bench`, in one go (about 6 minutes on one H100/H200):
#   bash benchmarks/gpu.sh [OUT]
# Installs carried wheels from .whl/ when there are any (diffusers, for a machine without it),
# prints the GPU, runs the benchmark on the DDPM paper's 35.7M CIFAR-10 U-Net, then trains and
# samples a small model through the CLI on the GPU. Results land in OUT (default: $OUT or /tmp/ddpm-gpu).
set -u
. "$(dirname "$0")/gpu_env.sh"
ddpm() { python3 -m ddpm_cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"

# 1. The benchmark: training at batch 512, sampling at batch 1024, with and without torch.compile.
timeout 400 python3 -m ddpm_cli bench --model-size ddpm-cifar10 --train-batch 512 --train-steps 20 \
  --sample-batch 1024 --sample-steps 10 --compile --format json > "$out/bench.json" 2> >(tee "$out/bench.log" >&2)
python3 -c "import json, sys; from ddpm_cli.cli.bench import table; print(table(json.load(open(sys.argv[1]))))" \
  "$out/bench.json" | tee "$out/bench.txt"

# 2. The host's share of a sampling step: the seeded noise at batch 1,024, with the copy to the GPU.
timeout 60 python3 benchmarks/seeded_noise.py --device cuda --batches 1024 | tee "$out/noise.txt"

# 3. No step synchronises the host with the GPU (training and sampling, under CUDA's sync debug mode).
timeout 90 python3 benchmarks/sync_check.py 2>&1 | grep -v "Warning\|warnings.warn\|^ *$" | tee "$out/sync.txt"

# 4. The CLI end to end on the GPU: a short bf16 run, then sampling from it (CUDA graphs).
run=/tmp/ddpm-gpu-run
rm -rf "$run" "$out/samples"
/usr/bin/time -f "train wall %e s" timeout 120 python3 -m ddpm_cli train fashion-mnist --max-steps 600 -b 256 --lr 1e-3 \
  --mixed-precision bf16 --checkpoint-every 600 -o "$run" --format json > "$out/train.json" 2> "$out/train.log"
tail -3 "$out/train.log"
/usr/bin/time -f "sample wall %e s" timeout 60 python3 -m ddpm_cli sample "$run" -n 64 -b 64 --sampler ddpm --steps 1000 --grid \
  -o "$out/samples" --format json > "$out/sample.json" 2> "$out/sample.log"
tail -3 "$out/sample.log"
cp "$out/samples/grid.png" "$out/grid.png" 2>/dev/null
rm -rf "$out/samples"
python3 -c "import json; s=json.load(open('$out/train.json')); print('train images/s', s['images_per_s'], 'final loss', s['final_loss'])"
