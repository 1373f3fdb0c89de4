#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root: installs what it needs, runs
# every stage, prints each stage's result and a final "N passed, N failed" line.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests mount FUSE filesystems and act as other users" >&2; exit 1; }
scripts/install-deps.sh test || exit 1

passed=0; failed=0; skipped=0; failures=(); allowed_skips=
# stage NAME COMMAND...: runs it, adds its counts (cargo's "test result:" lines or the
# "N passed, N failed" line of our own runners) to the totals.
stage() {
    local name=$1; shift
    echo "=== $name"
    local start=$SECONDS
    local log; log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local p f
    p=$(grep -E '^test result:|^[a-z]+: [0-9]+ passed, [0-9]+ failed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
    f=$(grep -E '^test result:|^[a-z]+: [0-9]+ passed, [0-9]+ failed' "$log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
    s=$(grep -E '^[a-z]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped' "$log" | grep -oE '[0-9]+ skipped' | awk '{s+=$1} END {print s+0}')
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi  # a stage that broke without counting
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    [ "$f" = 0 ] || failures+=("$name")
    echo "--- $name: $p passed, $f failed, $((SECONDS - start)) s"
    # scripts/check fails every skip but those of tests/allowed-skips, and prints that list.
    allowed_skips+=$(grep -E '^allowed skips: ' "$log" | tail -1 | sed 's/^allowed skips: //')$'\n'
    rm -f "$log"
}

# The FUSE transport (issue 19): everything that mounts runs once over FUSE-over-io_uring
# and once over /dev/fuse (TDEFS_IO_URING overrides [mount] io-uring for every daemon the
# tests start). The fuse module's enable_uring is switched on for it and put back after.
uring_param=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring_param" ]; then
    uring_was=$(cat "$uring_param")
    echo Y > "$uring_param"
    trap 'echo "$uring_was" > "$uring_param"' EXIT
    transports="io_uring /dev/fuse"
else
    echo "this kernel has no FUSE over io_uring ($uring_param is missing): /dev/fuse only; tests/transport.rs fails"
    transports="/dev/fuse"
fi
with() { local t=$1; shift; TDEFS_IO_URING=$([ "$t" = io_uring ] && echo on || echo off) "$@"; }

# together NAME1 CMD1... -- NAME2 CMD2... [-- ...]: stages at once, each into its own log,
# reported one after the other. They share nothing but the machine (the two transports'
# halves have their own scratch directories, mounts, database sockets), and most of their
# time is spent waiting on fsync, sleeps, servers starting and the linker, so together
# they take much less than one after the other: that is what keeps CI within 30 minutes.
replay() { cat "$1"; return "$(cat "$1.rc")"; }
together() {
    local names=() logs=() cmd=() t0=$SECONDS i
    while [ $# -gt 0 ]; do
        names+=("$1"); shift; cmd=()
        while [ $# -gt 0 ] && [ "$1" != -- ]; do cmd+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        logs+=("$(mktemp)")
        ( "${cmd[@]}" > "${logs[-1]}" 2>&1; echo $? > "${logs[-1]}.rc" ) &
    done
    echo "=== $(printf '%s | ' "${names[@]}" | sed 's/ | $//') (at once)"
    wait
    echo "--- at once: $((SECONDS - t0)) s"
    for i in "${!names[@]}"; do
        stage "${names[$i]}" replay "${logs[$i]}"
        rm -f "${logs[$i]}" "${logs[$i]}.rc"
    done
}
# Each half gets its own scratch directory for scripts/check.
scratch() { local d=$1; shift; mkdir -p "$d"; chmod 755 "$d"; TMPDIR=$d "$@"; }

# The cargo subcommands of the package and supply-chain stages compile beside the build.
together "build" scripts/lib/build.sh \
  -- "cargo-deb and cargo-deny (crates.io)" scripts/lib/cargo-tools.sh
# The unit tests mount nothing: they run with the io_uring half only.
together "unit and integration tests [io_uring]" with io_uring scripts/lib/cargo-tests.sh all --test-threads=4 \
  -- "integration tests [/dev/fuse]" with /dev/fuse scripts/lib/cargo-tests.sh integration --test-threads=4
# Alone: it switches enable_uring off and on again, which the other mounts must not see.
stage "transport selection (tests/transport.rs)" scripts/lib/cargo-tests.sh transport
# The Debian package: built with cargo-deb, its contents checked, installed, mounted through
# an fstab line with the installed mount helper, removed again. Beside it, deny.toml's
# licenses, duplicates and sources (cargo-deny) and the declared MSRV.
together "package (.deb)" scripts/package.sh --test \
  -- "supply chain" scripts/supply-chain.sh
# The xfstests-style suite with the real databases (crash and power-cut tortures, fsx), on
# each transport, two tests at once on each (-j 2: most tests wait on fsync, sleeps and
# database servers); the results tables go to target/.
together "suite (scripts/check -g auto) [io_uring]" with io_uring scratch /var/tmp/tdefs-ci-uring scripts/check -j 2 -g auto --results target/check-results.md \
  -- "suite (scripts/check -g auto) [/dev/fuse]" with /dev/fuse scratch /var/tmp/tdefs-ci-dev scripts/check -j 2 -g auto --results target/check-results-dev-fuse.md
# The XTS methods through the same golden outputs: the quick tests, fsx and the databases
# on aes256-xts, and on sm4-xts with the power-cut tests (the full suite on every method
# would not fit CI's 30 minutes; the tests of the groups time and export loop over the
# methods themselves, and those of convert name their methods, so they run once). One
# method per transport.
together "suite on aes256-xts [io_uring]" with io_uring scratch /var/tmp/tdefs-ci-uring scripts/check -j 2 --method aes256-xts -g quick -g fsx -g db -x powercut -x time -x export -x convert --results target/check-results-aes256-xts.md \
  -- "suite on sm4-xts [/dev/fuse]" with /dev/fuse scratch /var/tmp/tdefs-ci-dev scripts/check -j 2 --method sm4-xts -g quick -g fsx -g sqlite -g mssql -g powercut -x time -x export -x convert --results target/check-results-sm4-xts.md
# Benchmarks are not timed tests: CI only checks that the harness runs (tiny sizes).
stage "benchmark harness (quick)" scripts/bench/compare.sh --quick --out target/bench-quick

echo
[ ${#failures[@]} -eq 0 ] || echo "failed stages: ${failures[*]}"
echo "skips allowed (tests/allowed-skips): $(printf '%s' "$allowed_skips" | sed '/^$/d' | sort -u | paste -sd';' | sed 's/^$/none/')"
echo "summary: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
