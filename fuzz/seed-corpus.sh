#!/usr/bin/env bash
# Fill fuzz/corpus/<target>/ with seeds made from the committed fixtures.
# The corpus directory is not committed (see .gitignore); run this before `cargo fuzz run`.
set -euo pipefail
cd "$(dirname "$0")"
fx=../fixtures
max=${SEED_MAX_BYTES:-262144}

mkdir -p corpus/open_read corpus/open_with_backing
for f in "$fx"/*.qcow2; do
    if [ "$(stat -c %s "$f")" -le "$max" ]; then
        cp "$f" corpus/open_read/
    fi
done
cp regressions/*.qcow2 corpus/open_read/ 2>/dev/null || true

u32le() {
    local n=$1
    printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $(((n >> 8) & 255)))"
    printf "\\x$(printf %02x $(((n >> 16) & 255)))\\x$(printf %02x $(((n >> 24) & 255)))"
}
# seed NAME FLAGS TOP BACKING RAW  (empty string for a missing part); layout as in
# harness::join_backing_input: [flags][top_len u32 LE][backing_len u32 LE] top backing raw.
seed() {
    local name=$1 flags=$2 top=$3 backing=$4 raw=$5
    local tl=0 bl=0
    [ -n "$top" ] && tl=$(stat -c %s "$fx/$top")
    [ -n "$backing" ] && bl=$(stat -c %s "$fx/$backing")
    {
        printf "\\x$(printf %02x "$flags")"
        u32le "$tl"
        u32le "$bl"
        [ -n "$top" ] && cat "$fx/$top"
        [ -n "$backing" ] && cat "$fx/$backing"
        [ -n "$raw" ] && cat "$fx/$raw"
        true
    } >"corpus/open_with_backing/$name"
}
# flags: 1 = raw slice is the top's data file, 2 = the backing's data file,
#        4 = the backing's raw backing (or the top's, if the backing is not qcow2), 8 = zeros
seed chain-top-mid 0 chain-top.qcow2 chain-mid.qcow2 ""
seed overlay-nofmt-base 0 overlay-nofmt.qcow2 chain-base.qcow2 ""
seed overlay-raw 4 overlay-raw.qcow2 "" backing-raw-base.raw
seed overlay-raw-file 4 overlay-raw.qcow2 backing-raw-base.raw ""
seed extdata 1 extdata.qcow2 "" extdata.data
seed extdata-raw 1 extdata-raw.qcow2 "" extdata-raw.data
seed snap-over-zlib 0 snap.qcow2 zlib-4k-mixed.qcow2 ""
seed extl2-over-zstd 0 extl2-16k.qcow2 zstd-4k-mixed.qcow2 ""
seed top-zeros 8 chain-top.qcow2 "" ""
seed mid-over-extdata 2 chain-mid.qcow2 extdata.qcow2 extdata.data
seed mixed-over-overlay 4 zlib-4k-mixed.qcow2 overlay-raw.qcow2 backing-raw-base.raw
ls corpus/open_read | wc -l
ls corpus/open_with_backing | wc -l

# The parser targets: first clusters, snapshot tables, bitmap directories, L2 tables and
# compressed clusters cut from the fixtures (layouts as in fuzz_targets/<target>.rs).
python3 seed-parsers.py "$fx"/*.qcow2 "$fx"/hostile/*.qcow2
for t in header snapshot_table bitmap_directory l2_entries compressed_cluster; do
    echo "$t: $(ls corpus/$t | wc -l)"
done
