#!/usr/bin/env bash
# NVIDIA DALI for the GPU check on a machine that cannot download: DALI's wheels with the ones it needs
# beyond that machine's image (about 254 MB for Python 3.12) travel as one tar cut into parts of at most
# 55 MB, one part per call to the machine, and are joined, checked and installed there into /tmp/site
# (where bench/gpu_check.sh looks). The machine keeps /tmp only while it stays warm, so the calls follow
# each other without pause.
#
#   here:   bash bench/carry_dali.sh pack          # .carry/dali/part_0 ... part_N (ignored by git)
#   there:  bash bench/carry_dali.sh receive 0     # call 1 carries .carry/dali/part_0, and so on
#           bash bench/carry_dali.sh install       # after the last part (same call): join, check, install
#
# CARRY_DALI_WHEELS=DIR packs the wheels found in DIR instead of downloading them; CARRY_DALI_OUT (default
# .carry/dali) moves the parts, CARRY_DALI_PARTS (default /tmp/dali_parts) and CARRY_DALI_SITE (default
# /tmp/site) the receiving side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${CARRY_DALI_OUT:-.carry/dali}"
PARTS_DIR="${CARRY_DALI_PARTS:-/tmp/dali_parts}"
SITE="${CARRY_DALI_SITE:-/tmp/site}"
PART_SIZE="${CARRY_DALI_PART_SIZE:-55M}"
# DALI and what it needs that the GPU machine's image lacks (numpy, six, packaging are there).
WHEELS=(
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
  nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51
  astunparse==1.6.3 gast==0.6.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

pack() {
  local wheels="${CARRY_DALI_WHEELS:-}"
  rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR/wheels"
  if [ -n "$wheels" ]; then
    cp "$wheels"/*.whl "$OUT_DIR/wheels/"
  else
    local platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platform_args[@]}" -d "$OUT_DIR/wheels" "${WHEELS[@]}"
  fi
  (cd "$OUT_DIR/wheels" && sha256sum -- *.whl > SHA256SUMS)
  tar -cf "$OUT_DIR/dali.tar" -C "$OUT_DIR/wheels" .
  split -b "$PART_SIZE" -d -a 1 "$OUT_DIR/dali.tar" "$OUT_DIR/part_"
  rm -rf "$OUT_DIR/wheels" "$OUT_DIR/dali.tar"
  local n; n=$(find "$OUT_DIR" -name 'part_*' | wc -l)
  echo "$n parts in $OUT_DIR ($(du -sh "$OUT_DIR" | cut -f1)); on the GPU machine, one call per part:"
  for ((i = 0; i < n; i++)); do echo "  carry [\"$OUT_DIR/part_$i\"]: bash bench/carry_dali.sh receive $i"; done
  echo "  and in the last call: ... && bash bench/carry_dali.sh install && bash bench/gpu_check.sh"
}

receive() {
  local part="$OUT_DIR/part_$1"
  [ -f "$part" ] || { echo "carry_dali: $part is not here (name it in the call's carry)" >&2; exit 2; }
  mkdir -p "$PARTS_DIR"
  cp "$part" "$PARTS_DIR/"
  echo "carry_dali: parts received so far: $(cd "$PARTS_DIR" && ls part_* | tr '\n' ' ')"
}

install() {
  local wheels="$PARTS_DIR/wheels"
  ls "$PARTS_DIR"/part_* >/dev/null 2>&1 || { echo "carry_dali: no parts in $PARTS_DIR" >&2; exit 2; }
  rm -rf "$wheels" && mkdir -p "$wheels"
  # part_0 ... part_9 sort in order; a missing part leaves a truncated tar, which tar or sha256sum reports
  cat "$PARTS_DIR"/part_* | tar -x -C "$wheels" \
    || { echo "carry_dali: the parts do not join into a tar (one missing?)" >&2; exit 2; }
  (cd "$wheels" && sha256sum --quiet -c SHA256SUMS) \
    || { echo "carry_dali: a wheel fails its checksum (a part missing or damaged)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$wheels"/*.whl
  rm -rf "$wheels"
  echo "carry_dali: installed into $SITE (export PYTHONPATH=$SITE)"
}

case "${1:-}" in
  pack) pack ;;
  receive) [ $# -eq 2 ] || { echo "usage: $0 receive PART_NUMBER" >&2; exit 2; }; receive "$2" ;;
  install) install ;;
  *) echo "usage: $0 pack | receive PART_NUMBER | install" >&2; exit 2 ;;
esac
