#!/usr/bin/env bash
# Dictionary scale (issue 3): mount time and memory with a 1,000,000-entry dictionary, and
# the create rate of 8 parallel creators through a mount (group commit).
#   scripts/bench/dict-scale.sh [ENTRIES] [FILES]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/config.sh
entries=${1:-1000000}; files=${2:-40000}
scripts/install-deps.sh base
scripts/lib/build.sh || exit 1
work=$(mktemp -d /tmp/tdefs-scale.XXXXXX)
trap 'fusermount3 -u "$work/m" 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/tdefs-bench dict-load --entries "$entries" --workdir "$work/dict" --tdefs target/release/tdefs
mkdir -p "$work/b" "$work/m"
target/release/tdefs genkey "$work/key" >/dev/null 2>&1
tdefs_config "$work/b" "$work/m" "$work/key" aes256-ctr > "$work/c.toml"
target/release/tdefs mount --config "$work/c.toml" --daemon --log-file "$work/log"
for t in 1 8; do
    target/release/tdefs-bench create-rate --dir "$work/m/t$t" --threads "$t" --files "$files"
done
fusermount3 -u "$work/m"
