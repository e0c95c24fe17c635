#!/usr/bin/env bash
# Unpack one FlashAttention-4 pack (built by scripts/offline/fa4_bundle_build.sh) into $SITE
# (default /tmp/site): in fa4a/ the compiler extension ir.xz (checked against ir.sha256), in
# fa4b/ site.tar.xz. The two parts are independent; both must be in place before use.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
unxz() { if command -v xz >/dev/null 2>&1; then xz -dc "$1"; else
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer, 1 << 22)' "$1"; fi; }
if [ -f "$HERE/ir.xz" ]; then
  read -r sha rel < "$HERE/ir.sha256"
  mkdir -p "$SITE/$(dirname "$rel")"
  unxz "$HERE/ir.xz" > "$SITE/$rel.tmp"
  [ "$(sha256sum "$SITE/$rel.tmp" | cut -d' ' -f1)" = "$sha" ] || { echo "fa4: $rel: sha256 mismatch" >&2; exit 1; }
  chmod 755 "$SITE/$rel.tmp" && mv -f "$SITE/$rel.tmp" "$SITE/$rel"
  echo "fa4: installed $rel"
fi
if [ -f "$HERE/site.tar.xz" ]; then
  unxz "$HERE/site.tar.xz" | tar -C "$SITE" -xf -
  echo "fa4: unpacked into $SITE; now: export PYTHONPATH=$SITE/nvidia_cutlass_dsl/dsl_packages:\$PYTHONPATH"
fi
