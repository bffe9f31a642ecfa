#!/usr/bin/env bash
# The GPU session rehearsed on this CPU machine, under the GPU machine's own limits (docs/gpu.md):
#   make gpu-rehearsal OUT=DIR        (or: bash benchmarks/gpu_rehearsal.sh DIR)
# 1. A virtual environment holding only the GPU image's Python packages (benchmarks/gpu_image_packages.txt; CPU
#    torch standing in), built once and reused while that list is unchanged; nothing is ever installed into it.
# 2. A fresh machine directory holding only what travels: the tracked and untracked-not-ignored tree (nothing from
#    ../shared), then each call's carried paths as benchmarks/gpu_plan.json names them (made by gpu_pack.sh, for
#    this Python), and the machine's /tmp (KD_GPU_STATE) that survives between the calls.
# 3. Each call's exact command from gpu_plan.json, under its timeout_s, without network (unshare -n), with an empty
#    environment but PATH, HOME, OUT, the tiny switch and the time scale (KD_GPU_TIME_SCALE, default 3), the image's python3 first on PATH; call 2 is first tried
#    before call 1 and must refuse at once. DIR/call1 and DIR/call2 are the two calls' $OUT.
# 4. Each $OUT against the return limits (gpu_limits.py), and DIR/call2 must hold results.csv and report.html.
# KD_GPU_REHEARSE_RETRY=SECONDS then runs call 2 again on the same machine with that limit (docs/gpu.md's retry).
# Fails loudly, naming the broken limit or the failed call. Needs network for step 1 and gpu_pack.sh only.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(realpath -m "${1:?usage: $0 DIR}")
MACHINE=$DIR.machine
DATA=$(realpath -m "${KD_DATA_DIR:-$REPO/../shared/data}")
HOST_PY=${KD_GPU_HOST_PYTHON:-python3}
# every time limit, the command's and each step's, times this whole factor: the GPU machine has 16 fast cores, this
# one 2 shared ones, and a notebook kernel's start alone takes 15-35 s here; 1 rehearses the limits as they are
SCALE=${KD_GPU_TIME_SCALE:-3}
began=$(date +%s)
fail() { echo "GPU REHEARSAL FAILED: $*" >&2; exit 1; }
say() { echo "[rehearsal +$(($(date +%s) - began))s] $*"; }

packages=$REPO/benchmarks/gpu_image_packages.txt
key=$(cat "$packages" | sha256sum | cut -c1-12)
VENV=${KD_GPU_IMAGE_VENV:-$REPO/.cache/gpu-image-venv-$key}
if [ ! -x "$VENV/bin/python3" ]; then
  say "building the image's environment in $VENV"
  rm -rf "$VENV.tmp" && "$HOST_PY" -m venv "$VENV.tmp"
  "$VENV.tmp/bin/python3" -m pip install -q --no-deps -r "$packages" "${REHEARSAL_TORCH:-torch==2.13.0}" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV.tmp/bin/python3" -c "import torch, transformers" || fail "the image's environment does not import torch"
  mv "$VENV.tmp" "$VENV"  # a venv's scripts name its path: only python3 -m is used from it
fi
PYVER=$("$VENV/bin/python3" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')

rm -rf "$DIR" "$MACHINE" && mkdir -p "$DIR/call1" "$DIR/call2" "$MACHINE/repo" "$MACHINE/tmp" "$MACHINE/home"
say "what travels: the tree of $REPO into $MACHINE/repo"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -f "{}" ] && echo "{}"' \
  | tar cf - -T -) | tar xf - -C "$MACHINE/repo"
PACK=$MACHINE/pack
mkdir -p "$PACK" && cp -a "$MACHINE/repo/." "$PACK/"
(cd "$PACK" && git init -q . && echo ".gpu_carry/" > .git/info/exclude && KD_DATA_DIR=$DATA \
  KD_GPU_PYTHON_VERSION=$PYVER bash benchmarks/gpu_pack.sh) || fail "gpu_pack.sh (wheels for Python $PYVER)"

call() {  # call INDEX: the plan's call, its carried paths copied in, its command run as the device runs it
  local i=$1 name limit cmd carry rc
  name=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['calls'][$i]['name'])" "$REPO/benchmarks/gpu_plan.json")
  limit=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['calls'][$i]['timeout_s'])" "$REPO/benchmarks/gpu_plan.json")
  cmd=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['calls'][$i]['command'])" "$REPO/benchmarks/gpu_plan.json")
  for carry in $(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['calls'][$i]['carry']))" "$REPO/benchmarks/gpu_plan.json"); do
    rm -rf "${MACHINE:?}/repo/$carry" && mkdir -p "$(dirname "$MACHINE/repo/$carry")" && cp -a "$PACK/$carry" "$MACHINE/repo/$carry"
  done
  local out=$DIR/call$((i + 1))
  rm -rf "$out" && mkdir -p "$out"
  say "$name: $cmd  (timeout_s $limit x $SCALE, no network)"
  rc=0
  # a new network namespace has only a loopback interface, down: brought up, as the machine's is (kernels talk over it)
  (cd "$MACHINE/repo" && timeout -k 5 $((limit * SCALE)) unshare -n sh -c 'ip link set lo up && exec "$@"' sh \
    env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$MACHINE/home" LANG=C.UTF-8 OUT="$out" KD_GPU_TINY=1 \
    KD_GPU_TIME_SCALE=$SCALE KD_GPU_STATE="$MACHINE/tmp/kd-gpu" bash -c "$cmd") || rc=$?
  say "$name: exit $rc"
  return $rc
}

say "call 2 before call 1: must refuse at once"
t0=$(date +%s)
rc=0; call 1 > "$MACHINE/call2-first.log" 2>&1 || rc=$?
grep -q "CALL 1'S FILES ARE MISSING" "$MACHINE/call2-first.log" && [ $rc = 3 ] && (( $(date +%s) - t0 < 10 )) \
  || { cat "$MACHINE/call2-first.log"; fail "call 2 without call 1 did not refuse at once (exit $rc)"; }
rc=0; call 0 || rc=$?; [ $rc = 0 ] || fail "call 1 exited $rc (its log is above)"
rc=0; call 1 || rc=$?; [ $rc = 0 ] || fail "call 2 exited $rc (its log is above)"
calls="call1 call2"
if [ -n "${KD_GPU_REHEARSE_RETRY:-}" ]; then  # docs/gpu.md's retry: call 2 again on the same machine, a shorter limit
  say "retry: bash benchmarks/gpu_call2.sh $KD_GPU_REHEARSE_RETRY (timeout_s $KD_GPU_REHEARSE_RETRY x $SCALE)"
  mkdir -p "$DIR/call2-retry"
  rc=0
  (cd "$MACHINE/repo" && timeout -k 5 $((KD_GPU_REHEARSE_RETRY * SCALE)) unshare -n sh -c 'ip link set lo up && exec "$@"' sh \
    env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$MACHINE/home" LANG=C.UTF-8 OUT="$DIR/call2-retry" KD_GPU_TINY=1 \
    KD_GPU_TIME_SCALE=$SCALE KD_GPU_STATE="$MACHINE/tmp/kd-gpu" bash benchmarks/gpu_call2.sh "$KD_GPU_REHEARSE_RETRY") \
    || rc=$?
  [ $rc = 0 ] || fail "the retry of call 2 exited $rc"
  calls="$calls call2-retry"
fi
problems=0
for c in $calls; do
  python3 "$REPO/benchmarks/gpu_limits.py" returned "$DIR/$c" || problems=1
done
[ $problems = 0 ] || fail "what the calls left in \$OUT breaks the return limits (above)"
for f in results.csv report.html; do [ -s "$DIR/call2/$f" ] || fail "call 2 returned no $f"; done
say "passed in $(($(date +%s) - began)) s; what came back:"
ls -l "$DIR/call1" "$DIR/call2"
[ -n "${KD_GPU_KEEP_MACHINE:-}" ] || rm -rf "$MACHINE"
