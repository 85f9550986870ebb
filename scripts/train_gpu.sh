#!/usr/bin/env bash
# One prepared GPU call that continues training the built-in model, for the lent GPU machine.
#
#   Here, once:   pip download --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
#                   --platform manylinux2014_x86_64 diffusers==0.42.1 importlib_metadata lazy-importer
#   GPU call:     OUT=$OUT bash scripts/train_gpu.sh        (carry .whl; INIT=folder picks the model to continue)
#   Back here:    cat OUT/model.tar.part-* | tar xf - -C runs/gpu     (then evaluate runs/gpu/model)
#   Dry run (CPU, seconds; in the test suite):  DRY_RUN=1 OUT=/tmp/x bash scripts/train_gpu.sh
#
# The machine has no network: wheels it lacks come from .whl. Results come back as files of at most
# 15 MB (the transfer takes at most 8 files of 16 MB): the exported model as tar parts, the loss log.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
MINUTES="${MINUTES:-7}"
if [ -d .whl ] && ! python -c "import diffusers" 2>/dev/null; then
    python -m pip install -q --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DRY_RUN:-0}" = 1 ]; then
    ARGS=(--device cpu --steps 2 --batch 4 --pool 64 --checkpoint-every 1 --max-minutes 1)
else
    ARGS=(--device cuda --steps "${STEPS:-20000}" --batch "${BATCH:-1024}" --pool "${POOL:-100000}" --checkpoint-every 500 --max-minutes "$MINUTES")
fi
# Continue the shipped model (training resumes from any exported folder given as INIT).
INIT="${INIT:-attnguide/builtin/model}"
RUN="$(mktemp -d)/run"
PYTHONUNBUFFERED=1 python -m attnguide.cli train --out "$RUN" --init-from "$INIT" \
    --lr "${LR:-3e-4}" --warmup 100 --grounding "${GROUNDING:-0.2}" "${ARGS[@]}" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40
mkdir -p "$OUT"
tar cf - -C "$RUN" model | split -b 15m - "$OUT/model.tar.part-"
cp "$RUN/log.jsonl" "$OUT/log.jsonl"
ls -la "$OUT"
