#!/usr/bin/env bash
# The checks that need a GPU, in a few minutes on one CUDA machine:
#   - the `gpu`-marked tests: the CUDA VMM page backend (the pool state machine on device
#     memory, remapping without a copy), the worker operations on the GPU (prewarm, activate,
#     serve, deactivate, switch, KV lending) and the engine against transformers on the GPU;
#   - the activation benchmark on the GPU (`benchmarks/activation.py --device cuda`);
#   - `warmserve calibrate --device cuda`: a device profile of this GPU for the simulator
#     (OUT_DIR/gpu-profile.yaml, its report in OUT_DIR/gpu-profile-report/).
# It uses the machine's own python3 and its CUDA build of PyTorch, transformers, safetensors,
# pytest and hypothesis (nothing is installed), with this checkout on PYTHONPATH.
#
#     scripts/gpu_check.sh [OUT_DIR]        # default results/gpu; PYTHON=... to pick python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=$(realpath -m "${1:-results/gpu}")
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

"$PY" - <<'PY' || { echo "gpu_check: no CUDA device visible to PyTorch" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
print("torch", torch.__version__, "on", torch.cuda.get_device_name())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null

status=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_pages.py tests/test_worker.py \
    2>&1 | tee "$OUT/pytest.log" || status=1
(cd benchmarks && "$PY" activation.py --device cuda --models big --json "$OUT/activation.json") \
    2>&1 | tee "$OUT/activation.log" || status=1
"$PY" -m warmserve.cli calibrate --device cuda --quiet --out "$OUT/gpu-profile.yaml" \
    --note "Measured by scripts/gpu_check.sh on $(hostname)." \
    2>&1 | tee "$OUT/calibrate.log" || status=1
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED); logs in $OUT"
exit $status
