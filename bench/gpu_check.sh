#!/usr/bin/env bash
# The GPU check: kernel bench (short), an FSDP2 bf16 training run of a ~1B model on 1 GPU, vLLM vs HF
# scoring parity, peak memory; under 8 minutes on one H100. See bench/gpu_check.py for the parts.
#   bench/gpu_check.sh [--dry-run] [--out DIR] [--parts kernels fsdp_step vllm_parity]
#   --dry-run: the parts on the CPU at tiny sizes, as CI runs it; it checks the script, not a GPU.
# Writes DIR/gpu_check.json (default gpu_check_out/) and DIR/gpu_check.log; exits 1 if a part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu_check_out
dry=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --out) out=${args[i + 1]} ;;
    --dry-run) dry=1 ;;
  esac
done
if ((dry)); then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""     # the CPU, even on a GPU machine
elif command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
fi
mkdir -p "$out"
export PYTHONPATH="$PWD/pipeline:$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" bench/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.log"
