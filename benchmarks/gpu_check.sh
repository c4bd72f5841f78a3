#!/usr/bin/env bash
# One GPU, one command, under 10 minutes: bf16 DPO with sdpa (+ flash-attention 2 if it installs),
# QLoRA, DeepSpeed ZeRO-3, and prefalign vs TRL's DPOTrainer on a random Qwen2.5-0.5B-shaped model
# (benchmarks/gpu_check.py); then benchmarks/bench_real.py's comparison (prefalign defaults vs TRL vs
# LLaMA-Factory, LoRA and full, fp32, LF's demo rows) at the real model's shape (SmolLM2-135M's
# weights: set SMOLLM2_GGUF to the GGUF file or wheel when the machine has no network) and at a
# 0.5B shape; then benchmarks/bench_vlm.py (image pairs, prefalign vs TRL, LoRA and full) at Qwen2-VL-2B's
# shape. Prints tokens/s or pairs/s, peak GPU memory and an MFU figure (or the vision tower's runs) per run.
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: checks the script with a tiny model
# The GPU machine may have no network: every install is tried once with a time limit, and a run whose
# package is missing is skipped with its reason. prefalign itself runs from src/ (no install).
# Offline (how the H200 rows of benchmarks/RESULTS.md were made), prepare on a machine with the index:
#   WHEELS: a folder of wheels for what the GPU machine lacks (trl, datasets, bitsandbytes, gguf and
#     their needs: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
#     manylinux_2_28_x86_64 -d WHEELS NAME==VERSION`), installed with --no-index; no other install runs;
#   BENCH_CACHE: a bench_real --cache folder holding SmolLM2's config and tokenizer and LF's demo data
#     (what benchmarks/real_model.py prepares), with REAL_SHAPE=135m (its config, random weights) where
#     the 98 MB GGUF cannot travel.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

try_install() {  # try_install MODULE PIP-SPEC...: install when the module is missing, never fail
    python -c "import $1" 2>/dev/null && return 0
    [[ -n ${WHEELS:-} ]] && { echo "$1 is not among the wheels in $WHEELS; its runs will be skipped"; return 0; }
    timeout 120 python -m pip install -q --retries 0 --timeout 15 "${@:2}" >/dev/null 2>&1 \
        && echo "installed ${*:2}" || echo "could not install ${*:2}; its runs will be skipped"
}

if [[ "${1:-}" != "--dry-run" ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: torch sees no CUDA device; use --dry-run on a CPU"; exit 1; }
    if [[ -n ${WHEELS:-} ]]; then
        python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/prefalign-site \
            "$WHEELS"/*.whl || { echo "gpu_check: could not install the wheels in $WHEELS"; exit 1; }
        export PYTHONPATH="/tmp/prefalign-site:$PYTHONPATH" HF_HUB_OFFLINE=1
    fi
    for spec in "transformers>=4.56" "peft>=0.15" "datasets>=3.0" "accelerate>=1.0" "PyYAML" "matplotlib"; do
        module=$(echo "$spec" | sed 's/[<>=].*//' | tr 'A-Z-' 'a-z_'); [[ $module == pyyaml ]] && module=yaml
        try_install "$module" "$spec"
    done
    try_install deepspeed "deepspeed>=0.16"
    try_install bitsandbytes "bitsandbytes>=0.45"
    try_install trl "trl>=1.0"
    try_install flash_attn flash-attn --no-build-isolation
    try_install gguf gguf
    # LLaMA-Factory pins its own transformers: its own venv, sharing this python's torch
    lf_venv="$HOME/.prefalign-lf-venv"
    [[ -x $lf_venv/bin/python || -n ${WHEELS:-} ]] || { timeout 300 python -m venv --system-site-packages "$lf_venv" \
        && timeout 300 "$lf_venv/bin/pip" install -q "llamafactory==0.9.5" gguf >/dev/null 2>&1 \
        && echo "installed llamafactory 0.9.5 in $lf_venv" || echo "could not install llamafactory; its runs will be skipped"; }
fi
timeout 300 python benchmarks/gpu_check.py "$@"; status=$?
if [[ "${1:-}" == "--dry-run" ]]; then  # one short prefalign run of the real-model comparison, on the CPU
    real=(--runs pa-lora --steps 1)
else
    real=(--trl-python python --steps 6)  # without LF's venv: prefalign and TRL only
    [[ -x $lf_venv/bin/python ]] && real+=(--lf-python "$lf_venv/bin/python") || real+=(--runs pa-lora,trl-lora,pa-full,trl-full)
fi
[[ -n ${BENCH_CACHE:-} ]] && real+=(--cache "$BENCH_CACHE")
for shape in "${REAL_SHAPE:-real}" 0.5b; do
    timeout 240 python benchmarks/bench_real.py --shape "$shape" "${real[@]}" \
        || { echo "bench_real.py --shape $shape failed or ran out of time"; status=1; }
    [[ "${1:-}" == "--dry-run" ]] && break
done
# image preference pairs (benchmarks/bench_vlm.py): prefalign vs TRL at Qwen2-VL-2B's shape (random weights, bf16);
# bench_vlm.py skips it, exit 0, where torch sees no CUDA device (the dry run checks that path)
vlm=(--shape 2b --bf16 --batch-size 4 --grad-accum 1 --steps 4 --trl-python python)
[[ "${1:-}" == "--dry-run" ]] && vlm=(--shape 2b --bf16 --runs pa-lora)
timeout 420 python benchmarks/bench_vlm.py "${vlm[@]}" \
    || { echo "bench_vlm.py --shape 2b failed or ran out of time"; status=1; }
exit $status
