#!/usr/bin/env python3
"""The MSRV check: the `rust-version` that Cargo.toml declares must be at least every locked
dependency's own `rust-version` (else the declaration is a lie: the build needs a newer
compiler) and at most the compiler here. Clippy's `incompatible_msrv` lint (run beside this
by scripts/supply-chain.sh) checks tdefs' own code against the same version.
Only the machine's one toolchain exists (no other can be fetched), so the check reads the
versions rather than building with an old compiler."""
import json
import re
import subprocess
import sys


def ver(s):
    """"1.94.1" -> (1, 94, 1); "1.85" -> (1, 85, 0)."""
    parts = [int(x) for x in re.findall(r"\d+", s)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.loads(subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--offline"]))
pkgs = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]
ours = pkgs[root].get("rust_version")
if not ours:
    sys.exit("msrv: Cargo.toml declares no rust-version")
# What building tdefs, its tools and its tests compiles: every dependency reachable from the
# root (the root's dev-dependencies included, theirs not).
seen, todo = set(), [root]
while todo:
    i = todo.pop()
    if i in seen:
        continue
    seen.add(i)
    for d in nodes[i]["deps"]:
        if i != root and {k["kind"] for k in d["dep_kinds"]} == {"dev"}:
            continue
        todo.append(d["pkg"])
newer = sorted(
    (ver(pkgs[i]["rust_version"]), pkgs[i]["name"], pkgs[i]["version"], pkgs[i]["rust_version"])
    for i in seen
    if i != root and pkgs[i].get("rust_version") and ver(pkgs[i]["rust_version"]) > ver(ours)
)
rustc = re.search(r"rustc (\S+)", subprocess.check_output(["rustc", "--version"], text=True)).group(1)
failed = 0
if newer:
    failed += 1
    print(f"FAIL rust-version {ours} is older than what {len(newer)} locked dependencies need, e.g.:")
    for _, name, v, rv in newer[-5:]:
        print(f"       {name} {v}: rust-version {rv}")
else:
    print(f"ok   rust-version {ours} covers every locked dependency ({len(seen) - 1})")
if ver(rustc) < ver(ours):
    failed += 1
    print(f"FAIL rustc {rustc} is older than rust-version {ours}")
else:
    print(f"ok   rustc {rustc} >= rust-version {ours}")
sys.exit(1 if failed else 0)
