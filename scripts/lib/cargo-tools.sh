#!/usr/bin/env bash
# The cargo subcommands the scripts use, at pinned versions, installed from crates.io when
# missing: cargo-deb (scripts/package.sh) and cargo-deny (scripts/supply-chain.sh).
#   scripts/lib/cargo-tools.sh [deb] [deny]     # both when none is named
# scripts/test.sh runs it beside the build stage, where a compile of its own mostly fills
# the CPU the build leaves idle (linking, the last crates), instead of after it.
set -uo pipefail
CARGO_DEB_VERSION=3.8.0
CARGO_DENY_VERSION=0.20.2
want=("$@"); [ ${#want[@]} -gt 0 ] || want=(deb deny)
for t in "${want[@]}"; do
    case $t in
        deb) v=$CARGO_DEB_VERSION; flags=() ;;
        # A debug build: half the compile time of a release one, and it runs in seconds.
        deny) v=$CARGO_DENY_VERSION; flags=(--debug) ;;
        *) echo "cargo-tools: unknown tool $t (deb, deny)" >&2; exit 2 ;;
    esac
    cargo "$t" --version 2>/dev/null | grep -qF " $v" && continue
    echo "installing cargo-$t $v (crates.io)"
    cargo install --quiet --locked ${flags[@]+"${flags[@]}"} "cargo-$t" --version "$v" || { echo "cargo-tools: cargo-$t $v did not install" >&2; exit 1; }
done
