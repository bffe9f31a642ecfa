# Sourced by gpu_call1.sh and gpu_call2.sh (docs/gpu.md): the call's own deadline, its steps, the machine's state.
#
# Every step's time limit is derived from the time left before the call's deadline (the run's timeout_s, less
# MARGIN_S for collecting the results), a step that fails or runs out of time is logged and the call goes on
# (no `set -e`), and whatever a step leaves running is ended by its process id before the next step.
set -uo pipefail
SCALE=${KD_GPU_TIME_SCALE:-1}  # the rehearsal's slower CPU machine stretches every limit by this whole factor
LIMIT_S=$(( ${1:?usage: bash $0 LIMIT_S  (the timeout_s of the run call)} * SCALE ))
START_S=$(date +%s)
MARGIN_S=${KD_GPU_MARGIN_S:-$((10 + LIMIT_S / 30))}  # seconds kept for collecting results into $OUT before the limit
DEADLINE_S=$((START_S + LIMIT_S - MARGIN_S))
TINY=${KD_GPU_TINY:-0}  # 1: the rehearsal's tiny sizes (benchmarks/gpu_rehearsal.sh), on a CPU
OUT=${OUT:?OUT is the output folder of the device tool; the rehearsal sets it too}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${KD_GPU_STATE:-/tmp/kd-gpu}  # outside the working tree: kept between calls while the machine stays warm
SITE=$STATE/site  # the carried wheels, installed the way the device README says (--target, then PYTHONPATH)
MARKER=kd-gpu-$$-$START_S  # in the environment of every process a step starts: how its leftovers are found
WORK=$STATE/${CALL:?set CALL before sourcing}  # this call's files, collected into $OUT at the end
CARRY=$REPO/.gpu_carry
cd "$REPO" || exit 2
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"

# offline: nothing outside the machine can be reached, so no library may try
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  PYTHONPATH=$SITE:$REPO KD_DATA_DIR=$STATE/data KD_CACHE_DIR=$STATE/cache MPLCONFIGDIR=$STATE/matplotlib \
  IPYTHONDIR=$STATE/ipython JUPYTER_PLATFORM_DIRS=1
# the wheels' data files (nbconvert's HTML templates, the kernel spec) land in $SITE/share, not in a prefix
export JUPYTER_PATH=$SITE/share/jupyter

left() { echo $((DEADLINE_S - $(date +%s))); }

log() {  # to the caller (the reply's output_tail) and to the session log that comes back
  echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START_S))s] $*" | tee -a "$WORK/session.log"
}

end_leftovers() {  # end, by process id, every process a step started that is still running (notebook kernels)
  local pid env
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qx "KD_GPU_MARKER=$MARKER"; then
      kill -9 "$pid" 2>/dev/null && log "  ended leftover process $pid"
    fi
  done
}

step() {  # step NAME MAX_S RESERVE_S CMD...: at most MAX_S, ending RESERVE_S before the deadline at the latest
  local name=$1 max=$(($2 * SCALE)) reserve=$(($3 * SCALE)) limit rc began
  shift 3
  limit=$(( $(left) - reserve ))
  (( limit > max )) && limit=$max
  if (( limit < 3 )); then
    log "$name: SKIPPED, $(left) s left before the deadline"
    return 124
  fi
  log "$name: limit ${limit} s"
  began=$(date +%s)
  timeout -k 3 "$limit" env KD_GPU_MARKER="$MARKER" "$@" >>"$WORK/$name.log" 2>&1
  rc=$?
  end_leftovers
  log "$name: exit $rc after $(( $(date +%s) - began )) s$( ((rc == 124 || rc == 137)) && echo ' (TIME LIMIT)')"
  [ $rc = 0 ] || tail -5 "$WORK/$name.log" | sed 's/^/    /'
  return $rc
}

put() {  # put SRC NAME: one file into $OUT (flat; the return limits allow 8 of 16 MiB each)
  if [ -f "$1" ]; then cp "$1" "$OUT/$2"; else log "not returned: $1 does not exist"; fi
}

put_tgz() {  # put_tgz NAME DIR PATTERN...: files under DIR matching the find patterns, as one .tgz in $OUT
  local name=$1 dir=$2 list
  shift 2
  list=$(mktemp)
  (cd "$dir" 2>/dev/null && find . -type f \( "$@" \) | sort) > "$list"
  if [ -s "$list" ]; then
    tar czf "$OUT/$name" -C "$dir" -T "$list"
    local size
    size=$(stat -c %s "$OUT/$name")
    if (( size > 16 * 1024 * 1024 )); then
      log "not returned: $name is $((size >> 20)) MiB, over the 16 MiB a file may be"
      rm -f "$OUT/$name"
    fi
  fi
  rm -f "$list"
}

finish() {  # check $OUT against the return limits; the caller sees the verdict, the call's exit code says it
  log "done with $(left) s left before the deadline (+${MARGIN_S} s margin)"
  put_tgz logs.tgz "$WORK" -name '*.log' -o -name '*.txt'
  python3 benchmarks/gpu_limits.py returned "$OUT"
}
