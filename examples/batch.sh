#!/usr/bin/env bash
# A batch job: the same model through each sampler, stopping at the first failure with its exit code.
#
#   MODEL=fashion-mnist OUT=batch-out N=8 STEPS=20 bash examples/batch.sh
#
# stdout gets the image paths and nothing else; rerunning skips the images already made.
set -euo pipefail

MODEL=${MODEL:-fashion-mnist}
OUT=${OUT:-batch-out}
N=${N:-8}
STEPS=${STEPS:-20}
DDPM=${DDPM:-ddpm}

for sampler in ddpm ddim dpmpp-2m; do
    status=0
    $DDPM sample "$MODEL" --sampler "$sampler" --steps "$STEPS" -n "$N" -o "$OUT/$sampler" --skip-existing -q || status=$?
    if [ "$status" -ne 0 ]; then
        echo "batch: $sampler failed with exit code $status" >&2
        exit "$status"
    fi
done
