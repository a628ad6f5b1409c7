#!/usr/bin/env bash
# The GPU check spread over five back-to-back calls on one warm machine, each also receiving one part of
# DALI's wheels (bench/carry_dali.sh), so that DALI is installed for the data benchmark of the last call
# and no call waits on a transfer alone. Call K (0..4) carries .whl and .carry/dali/part_K and runs:
#
#   bash bench/gpu_session.sh K
#
#   0  build the extension, GPU tests                                   (about 190 s on an H200)
#   1  contrastive losses (with the bound report), fused adapter        (about 120 s)
#   2  training step: its levers beside the graphed plain steps, then   (about 350 s)
#      their first steps against the faithful one
#   3  caption decoding (with graph+triton), retrieval, IMTL-G          (about 170 s)
#   4  install DALI; data-backend GPU tests; data benchmark             (about 60 s)
#
# Each call's tables come back in $OUT (RESULTS_section.md, parts.tar.gz, gpu_check.log); the machine keeps
# the build and the received parts only while it stays warm (30 s after a call), so the calls follow each
# other without pause. GPU_SESSION_BUDGET overrides a slice's time budget (seconds). Without the DALI
# part a call still runs its slice.
set -uo pipefail
cd "$(dirname "$0")/.."
slice="${1:-}"
case "$slice" in
  0) parts="build tests"; budget=220 ;;
  1) parts="bench"; budget=160; export GPU_CHECK_BENCH="contrastive adapter" ;;
  2) parts="bench"; budget=420; export GPU_CHECK_BENCH="train_levers train_levers_check" ;;
  3) parts="bench"; budget=200; export GPU_CHECK_BENCH="caption retrieval imtl" ;;
  4) parts="tests bench"; budget=120; export GPU_CHECK_BENCH="data" GPU_CHECK_TESTS="tests/test_data_backends.py" ;;
  *) echo "usage: $0 0|1|2|3|4 (see the table at the top)" >&2; exit 2 ;;
esac
if [ -f ".carry/dali/part_$slice" ]; then
  bash bench/carry_dali.sh receive "$slice" || echo "gpu_session: DALI part $slice not received"
fi
if [ "$slice" = 4 ]; then
  bash bench/carry_dali.sh install || echo "gpu_session: DALI not installed; the data benchmark runs without it"
fi
GPU_CHECK_PARTS="$parts" GPU_CHECK_BUDGET="${GPU_SESSION_BUDGET:-$budget}" bash bench/gpu_check.sh
