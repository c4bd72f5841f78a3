#!/usr/bin/env bash
# One GPU, one command, under 8 minutes: bf16 DPO with sdpa (+ flash-attention 2 if it installs),
# QLoRA, DeepSpeed ZeRO-3, and prefalign vs TRL's DPOTrainer on a random Qwen2.5-0.5B-shaped model.
# Prints tokens/s, peak GPU memory and an MFU estimate per run (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: checks the script with a tiny model
# The GPU machine may have no network: every install is tried with a time limit, and a run whose
# package is missing is skipped with its reason. prefalign itself runs from src/ (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

try_install() {  # try_install MODULE PIP-SPEC...: install when the module is missing, never fail
    python -c "import $1" 2>/dev/null && return 0
    timeout 120 python -m pip install -q "${@:2}" >/dev/null 2>&1 \
        && echo "installed ${*:2}" || echo "could not install ${*:2}; its runs will be skipped"
}

if [[ "${1:-}" != "--dry-run" ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: torch sees no CUDA device; use --dry-run on a CPU"; exit 1; }
    for spec in "transformers>=4.56" "peft>=0.15" "datasets>=3.0" "accelerate>=1.0" "PyYAML" "matplotlib"; do
        module=$(echo "$spec" | sed 's/[<>=].*//' | tr 'A-Z-' 'a-z_'); [[ $module == pyyaml ]] && module=yaml
        try_install "$module" "$spec"
    done
    try_install deepspeed "deepspeed>=0.16"
    try_install bitsandbytes "bitsandbytes>=0.45"
    try_install trl "trl>=1.0"
    try_install flash_attn flash-attn --no-build-isolation
fi
exec timeout 450 python benchmarks/gpu_check.py "$@"
