#!/usr/bin/env bash
# One prepared GPU call: every attnguide method and the peers on SD 1.5- and SDXL-shaped random-weight
# models in fp16 (batch 1 and 4; SD 1.5 at 512/1024/1536, SDXL at 1024), within ~7 minutes.
#
#   Here, once:   pip download --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
#                   --platform manylinux2014_x86_64 diffusers==0.42.1 importlib_metadata lazy-importer
#   GPU call:     OUT=$OUT bash benchmarks/gpu.sh        (carry .whl; results: $OUT/gpu_bench.{json,md})
#   Dry run (CPU, tiny model, seconds; in the test suite):  OUT=/tmp/x bash benchmarks/gpu.sh --dry-run
#
# The machine has no network: wheels it lacks come from .whl (as scripts/train_gpu.sh). The JSON and the
# markdown table are rewritten after every configuration, so a timeout keeps what was measured;
# BUDGET_S (default 400) is when the benchmark stops starting new work (seconds from its start).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
if [ -d .whl ] && ! python -c "import diffusers" 2>/dev/null; then
    python -m pip install -q --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 python benchmarks/gpu_bench.py --out "$OUT" --budget-s "${BUDGET_S:-400}" "$@" 2>&1 | tee "$OUT/gpu_bench.log" | tail -n 120
