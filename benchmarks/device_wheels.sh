#!/usr/bin/env bash
# Fetch (here, where pip reaches PyPI) the pure-Python / stable-ABI wheels that a GPU machine
# without network needs to run benchmarks/gpu_suite.sh: open_clip and its two missing deps,
# torchattacks (peer reference of the PGD tests); xformers (the optional attention path) only when asked,
# XFORMERS=xformers==0.0.35 bash benchmarks/device_wheels.sh: that wheel, built for torch 2.10, loads no
# kernels on the device's torch 2.11 (3.3 of the 4.9 MB carried, for rows that skip).
# Everything else the suite imports (torch, triton, peft, timm, pytest-benchmark, pybind11,
# regex, safetensors, huggingface_hub, ...) is already in the device image (device/KINDS.md).
#
#   bash benchmarks/device_wheels.sh            # -> .whl/ (ignored by .gitignore, so it travels only when carried)
#
# Then, in one device call (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
#   OUT=$OUT bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DEVICE_PYTHON:-3.12}"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 torchattacks==3.5.1 ${XFORMERS:-}
ls -la .whl
