#!/usr/bin/env bash
# Run the release test binaries cargo has built, without cargo: two runs (one per FUSE
# transport) can then go at once, where two `cargo test` would queue on cargo's lock of the
# build directory. Prints what `cargo test` prints per binary ("test result: ..." lines).
#   scripts/lib/cargo-tests.sh all|integration|NAME [ARGS for the test binaries...]
# all: unit and integration tests; integration: those of tests/*.rs; NAME: tests/NAME.rs
# alone. all and integration leave out tests/transport.rs, which switches the fuse module's
# enable_uring and so must not run beside other mounts: run it by name.
set -uo pipefail
cd "$(dirname "$0")/../.."
which=$1; shift
mapfile -t bins < <(cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
which = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    kind = m["target"]["kind"]
    name = m["target"]["name"]
    if (which == "all" or (which == "integration" and kind == ["test"])) and name != "transport" or name == which:
        print(m["target"]["name"] + "\t" + str(kind[0]) + "\t" + m["executable"])
' "$which")
[ ${#bins[@]} -gt 0 ] || { echo "no test binaries found (cargo test --no-run failed?)" >&2; exit 1; }
rc=0
for b in "${bins[@]}"; do
    IFS=$'\t' read -r name kind exe <<< "$b"
    echo "     Running $kind $name ($exe)"
    "$exe" "$@" || rc=1
done
exit $rc
