#!/usr/bin/env bash
# cvlab's check on one GPU (<= 8 minutes): resnet50 bf16 images/s through cvlab beside a plain PyTorch loop (with MFU),
# yolov3 on shapes_det to mAP@0.5 >= 0.8, a DDP smoke test when more than one GPU is visible, BiSeNet bf16 inference
# images/s, yolov5s and yolov7 bf16 training images/s on shapes_det at 640 px, and stylegan2 at 64 px on drawn shapes
# for 2 minutes (images/s, test FID on cvlab features and its ratio to the untrained generator's). Prints one table and
# writes gpu_check.json. Every argument goes to scripts/gpu_check.py (--help lists them; --dry-run checks the script on
# the CPU). Uses .venv/bin/python when there is one (else $PYTHON or python3) and installs cvlab into it (pip install -e .)
# only if it cannot import it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import cvlab" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet -e .
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
