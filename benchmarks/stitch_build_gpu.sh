#!/usr/bin/env bash
# The device check of the stitch build: bash benchmarks/stitch_build_gpu.sh OUT_DIR [FINETUNE_STEPS]
# Builds tiny-sd3 x tiny-clip with its baselines on the GPU (device=cuda), runs the fidelity benchmark on it and on
# the committed artifact (whose CPU figures are in docs/fidelity_sd3_clip.json) with --device cuda.
# Needs torch, diffusers, open_clip and ftfy only (no Ray); a few minutes on one H200 at the default 4800 steps.
# Its finetune runs in bf16 autocast (finetune.precision=auto); add finetune.precision=fp32 to match the CPU build.
set -euo pipefail
out=${1:-/tmp/stitch_gpu}
steps=${2:-4800}
mkdir -p "$out"
python -m rlstitch.stitch.build backbone=tiny-sd3 reward=tiny-clip out="$out/sd3-clip" device=cuda \
  i_tolerance=0.06 finetune.steps="$steps" finetune.eval_every=400 baselines=true
python -m rlstitch.eval.fidelity --stitch "$out/sd3-clip" --device cuda --json "$out/fidelity_gpu_build.json"
python -m rlstitch.eval.fidelity --stitch rlstitch/tinyworld/weights/stitchvm/sd3-clip --device cuda \
  --json "$out/fidelity_committed_on_gpu.json"
