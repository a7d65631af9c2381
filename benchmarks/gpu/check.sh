#!/usr/bin/env bash
# The GPU check, end to end on a machine without network (see README "A GPU check"):
#   1. the CUDA tests (tests/test_cuda.py): bf16 teacher-forced check and exact mode on
#      a realistically sized random-init target;
#   2. the eager and compiled decode paths side by side (benchmarks/decode_path.py);
#   3. the suites in bfloat16 at T=0 and T=0.6 on a random-init Qwen3-8B-shaped target
#      built from benchmarks/gpu/qwen3-8b.json (no weights), printing each case's
#      lossless statistics and speedup.
# Run `make gpu-prepare` first on a machine with PyPI and the embedded model: it puts the
# tokenizer and the wheels this needs under build/gpu/ (a few MB), which travel with the
# checkout. Then on the GPU machine: `make gpu-check` (or this script).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
BUILD=build/gpu
ARGS=${ARGS:-}
if [ ! -f "$BUILD/tokenizer.json" ]; then
  echo "gpu-check: $BUILD/tokenizer.json is missing: run 'make gpu-prepare' first" >&2
  exit 2
fi
if ! "$PY" -c "import pytest_specdec, pytest_benchmark, tabulate" 2>/dev/null; then
  # offline: the wheels gpu-prepare downloaded, then this checkout in place
  "$PY" -m pip install -q --no-index --find-links "$BUILD/wheels" pytest-benchmark tabulate
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)"
"$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
cp benchmarks/gpu/qwen3-8b.json "$BUILD/config.json"
# the decode paths side by side: the step against weights / bandwidth, verify costs by
# width, on the eager and the compiled path (docs/engine.md); a failure here is reported
# and the check goes on
"$PY" -m benchmarks.decode_path --target "$BUILD/config.json" --device cuda \
  --dtype bfloat16 --rounds 3 || echo "gpu-check: benchmarks.decode_path failed" >&2
"$PY" -m pytest suites/ -q -p no:cacheprovider --specdec-target "$BUILD/config.json" \
  --specdec-device cuda --specdec-dtype bfloat16 --specdec-temperature 0,0.6 \
  --specdec-problems 2 --specdec-max-new-tokens 256 --specdec-timed-rounds 3 \
  --specdec-report-dir reports/gpu $ARGS
"$PY" -m pytest suites/ -q -p no:cacheprovider --specdec-target "$BUILD/config.json" \
  --specdec-device cuda --specdec-dtype bfloat16 --specdec-temperature 0 \
  --specdec-paradigm multi_round --specdec-drafter pld --specdec-drafter suffix \
  --specdec-no-peer --specdec-problems 2 --specdec-max-new-tokens 256 \
  --specdec-lossless exact --specdec-report-dir reports/gpu-exact $ARGS
