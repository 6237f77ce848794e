#!/usr/bin/env bash
# Flow-GRPO rollout/train log-prob consistency on a GPU (bf16 and fp32): bash benchmarks/grpo_logp_gpu.sh [OUT_DIR]
# Ray-free; needs torch, peft, safetensors and diffusers (SD3Transformer2DModel); no open_clip, omegaconf, ray or
# deepspeed (random text conditions, no text encoder). Well under a minute on an H200 after the imports.
# On a machine without CUDA: DEVICE=cpu bash benchmarks/grpo_logp_gpu.sh (PYTHON=... picks the interpreter)
set -euo pipefail
out=${1:-docs}
mkdir -p "$out"
"${PYTHON:-python}" benchmarks/grpo_logp.py --device "${DEVICE:-cuda}" --dtypes bfloat16,float32 --json "$out/grpo_logp_gpu.json"
"${PYTHON:-python}" benchmarks/grpo_logp.py --device "${DEVICE:-cuda}" --dtypes bfloat16 --variant cps --json "$out/grpo_logp_gpu_cps.json"
