#!/usr/bin/env bash
# Supply chain: the dependency policy of deny.toml (licenses, duplicate versions, sources)
# with cargo-deny, and the declared MSRV (scripts/msrv.py, clippy's incompatible_msrv).
# Prints "supply: N passed, N failed". The advisories check needs the RustSec database from
# github.com, which CI cannot reach: run `cargo deny check advisories` where it can.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/lib/cargo-tools.sh deny || exit 1
# `cargo build` downloads only the crates this platform compiles; cargo metadata (which both
# checks below read, offline) needs every platform's (wasi, windows…). Fetch them from the
# registry first, else a fresh machine fails here though nothing is wrong with the tree.
if ! cargo fetch --locked --quiet; then
    echo "FAIL cargo fetch --locked: the registry is unreachable or Cargo.lock is stale"
    echo "supply: 0 passed, 1 failed"
    exit 1
fi
passed=0; failed=0
run() {
    local name=$1; shift
    if "$@"; then echo "ok   $name"; passed=$((passed + 1)); else echo "FAIL $name"; failed=$((failed + 1)); fi
}
run "cargo deny check licenses bans sources (deny.toml)" cargo deny --offline check licenses bans sources
run "rust-version covers the locked dependencies (scripts/msrv.py)" python3 scripts/msrv.py
run "no std API newer than rust-version (clippy incompatible_msrv)" \
    cargo clippy --release --quiet --lib --bins -- -A clippy::all -D clippy::incompatible_msrv
echo "supply: $passed passed, $failed failed"
[ "$failed" = 0 ]
