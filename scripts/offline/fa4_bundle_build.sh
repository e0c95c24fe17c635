#!/usr/bin/env bash
# Build offline packs of FlashAttention-4 (attention=fast / flash_attn) for a GPU machine without
# internet whose uploads are capped per transfer: CPython 3.12, x86_64, CUDA 13 driver, torch
# already installed. Two parts, each under ~55 MB, carried in two consecutive calls:
#   <out>/fa4a/ir.xz          the CuTe DSL's compiler extension (_cutlass_ir, 193 MB unpacked)
#   <out>/fa4b/site.tar.xz    everything else, unpacked as pip --target would
# and scripts/offline/fa4_bundle_install.sh beside each as install.sh.
#
#   bash scripts/offline/fa4_bundle_build.sh [OUTDIR]     # default: .vendor of this checkout
# On the GPU machine (after the .whl install into /tmp/site), one call per part, same machine:
#   bash .vendor/fa4a/install.sh            # call 1
#   bash .vendor/fa4b/install.sh            # call 2 (prints the PYTHONPATH line to export)
#   export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD
# (nvidia-cutlass-dsl puts dsl_packages on sys.path through a .pth file, which a --target
# install on PYTHONPATH never runs.)  Tested: imports on the CPU machine (cp311 twin);
# flash-attn 4 ran on the H200 from packs of the same wheels in the fourth session.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
OUT=$(mkdir -p "${1:-$TOP/.vendor}" && cd "${1:-$TOP/.vendor}" && pwd)
WORK=${WORK:-/tmp/fa4-build}
PIP=${PIP:-python3 -m pip}
WHEELS=(
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
  cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 protobuf==7.36.2 apache-tvm-ffi==0.1.11
  torch-c-dlpack-ext==0.1.5 einops==0.8.2 quack-kernels==0.6.5
)
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
mkdir -p "$WORK/wheels"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WORK/wheels" "${WHEELS[@]}"
rm -rf "$WORK/site" && mkdir -p "$WORK/site"
for w in "$WORK"/wheels/*.whl; do python3 -m zipfile -e "$w" "$WORK/site"; done
mkdir -p "$OUT/fa4a" "$OUT/fa4b"
xz -T0 -6 -c "$WORK/site/$IR" > "$OUT/fa4a/ir.xz"
(cd "$WORK/site" && sha256sum "$IR") > "$OUT/fa4a/ir.sha256"
rm "$WORK/site/$IR"
tar -C "$WORK/site" -cf - . | xz -T0 -9 > "$OUT/fa4b/site.tar.xz"
cp "$HERE/fa4_bundle_install.sh" "$OUT/fa4a/install.sh"
cp "$HERE/fa4_bundle_install.sh" "$OUT/fa4b/install.sh"
if exclude=$(cd "$TOP" && git rev-parse --path-format=absolute --git-path info/exclude 2>/dev/null); then
  grep -qx '/.vendor/' "$exclude" 2>/dev/null || echo '/.vendor/' >> "$exclude"
fi
du -sh "$OUT/fa4a" "$OUT/fa4b"
