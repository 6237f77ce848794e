#!/usr/bin/env bash
# The GPU runs behind docs/value_cost_h200/ (one H200, bf16, 1024 px): bash benchmarks/value_cost_gpu.sh OUT_DIR
# Needs only torch, diffusers and open_clip (random weights: nothing is downloaded). About 7 minutes on an H200.
set -uo pipefail
out=${1:-docs/value_cost_h200}
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
b="python benchmarks/value_cost.py"
$b --preset sd35-medium --reward clip-vit-l-14 --cuts 4,8,12 --batch 2 --json "$out/sd35m_clipl_b2.json"
$b --preset sd35-medium --reward hpsv2 --cuts 8 --batch 1 --json "$out/sd35m_hps_b1.json"
$b --preset flux-dev --reward hpsv2 --cuts 8,19 --batch 1 --json "$out/flux_hps_b1.json"
$b --preset sd35-medium --reward hpsv2 --cuts 4,8,12 --batch 4 --repeats 10 --json "$out/sd35m_hps_b4.json"
$b --preset sd35-large --reward clip-vit-l-14 --cuts 8,12 --batch 2 --repeats 10 --json "$out/sd35l_clipl_b2.json"
$b --preset sd35-medium --reward clip-vit-l-14 --cuts 4,8,12 --batch 2 --repeats 10 --json "$out/sd35m_clipl_b2_rep.json"
$b --preset sd35-medium --reward hpsv2 --cuts 8 --batch 2 --repeats 5 --dps-steps 20 --json "$out/sd35m_hps_b2_dps20.json"
