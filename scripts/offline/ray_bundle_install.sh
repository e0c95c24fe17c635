#!/bin/sh
# Unpack the offline ray[serve] bundle (raypack-cp<TAG>.tar.xz beside this file, TAG of the
# python that runs flashdreams) into a pip --target folder, /tmp/site by default:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   sh .vendor/raypack/install.sh            # [TARGET] [PYTHON]: default /tmp/site python3
#   export PYTHONPATH=/tmp/site:$PWD
#
# If ffmpeg.xz lies beside it (build.sh with FFMPEG=1), that static ffmpeg goes to
# TARGET/ffmpeg/ffmpeg; /v1/realtime/video needs an ffmpeg: export IMAGEIO_FFMPEG_EXE=...
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${1:-/tmp/site}
PY=${2:-python3}
TAG=$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
PACK=$HERE/raypack-cp$TAG.tar.xz
if [ ! -f "$PACK" ]; then
  echo "install.sh: no $PACK ($PY is CPython $TAG; build.sh $TAG makes it)" >&2
  exit 1
fi
mkdir -p "$TARGET"
if command -v xz >/dev/null 2>&1; then
  xz -dc "$PACK" | tar -xf - -C "$TARGET" --no-same-owner
else  # no xz-utils: python's lzma reads the same file
  "$PY" - "$PACK" "$TARGET" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    tar.extractall(sys.argv[2], **kw)
EOF
fi
chmod 755 "$TARGET/ray/core/src/ray/raylet/raylet" "$TARGET/ray/core/src/ray/gcs/gcs_server"
if [ -f "$HERE/ffmpeg.xz" ]; then
  mkdir -p "$TARGET/ffmpeg"
  xz -dc "$HERE/ffmpeg.xz" > "$TARGET/ffmpeg/ffmpeg" 2>/dev/null \
    || "$PY" -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
      "$HERE/ffmpeg.xz" > "$TARGET/ffmpeg/ffmpeg"
  chmod 755 "$TARGET/ffmpeg/ffmpeg"
  echo "install.sh: ffmpeg in $TARGET/ffmpeg/ffmpeg (export IMAGEIO_FFMPEG_EXE=$TARGET/ffmpeg/ffmpeg)"
fi
"$PY" -c "import sys; sys.path.insert(0, '$TARGET'); import ray, ray.serve, starlette, uvicorn, websockets, PIL; print('install.sh: ray', ray.__version__, 'in $TARGET')"
