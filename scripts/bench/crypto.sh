#!/usr/bin/env bash
# Throughput on one core (criterion, benches/crypto.rs: CTR keystream and XTS encryption)
# beside `openssl speed` for the same ciphers, with tdefs/openssl ratios at 64 KiB.
#   scripts/bench/crypto.sh [--quick]
# Both sides divide by CPU time, not wall time (criterion: the thread's CPU time, see
# benches/crypto.rs; openssl speed: CPU user time unless -elapsed), so the figures and the
# ratios hold up on a busy 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=3; [ "${1:-}" = --quick ] && secs=1
out=$(mktemp); trap 'rm -f "$out"' EXIT
echo "== tdefs (RustCrypto aes + ctr; own XTS; constant-time sm4, AES-NI path), median per call"
cargo bench --quiet --bench crypto -- --warm-up-time 1 --measurement-time "$secs" 2>/dev/null \
    | awk '/^(keystream|xts)\// {name=$1} /thrpt:/ && name {print name, $4, $5; name=""}' | tee "$out"
echo "== openssl speed -evp (single core), 4 KiB and 64 KiB buffers, in GB/s (1 GiB/s = 1.074 GB/s)"
for c in aes-128-ctr aes-256-ctr sm4-ctr aes-128-xts aes-256-xts sm4-xts; do
    for bytes in 4096 65536; do
        line=$(openssl speed -evp "$c" -bytes "$bytes" -seconds "$secs" 2>/dev/null | tail -1 || true)
        case "$line" in
            *k) printf '%s/%s %.3f GB/s\n' "$c" "$bytes" "$(echo "$line" | awk '{sub(/k$/, "", $NF); print $NF / 1e6}')" ;;
            *) echo "$c/$bytes: not supported by $(openssl version | cut -d' ' -f1-2)" ;;
        esac
    done
done | tee -a "$out"
echo "== tdefs / openssl at 64 KiB"
awk '
    function gbs(v, unit) { return unit == "GiB/s" ? v * 1.073741824 : unit == "MiB/s" ? v * 0.001048576 : v }
    /^(keystream|xts)\// { split($1, p, "/"); if (p[3] == 65536) t[p[2]] = gbs($2, $3) }
    /^[a-z0-9-]+\/65536 [0-9.]+ GB\/s/ { split($1, p, "/"); o[p[1]] = $2 }
    END {
        split("aes128-ctr aes-128-ctr aes256-ctr aes-256-ctr sm4-ctr sm4-ctr aes128-xts aes-128-xts aes256-xts aes-256-xts sm4-xts sm4-xts", m, " ")
        for (i = 1; i < 12; i += 2) {
            if (!(m[i] in t)) continue
            if (m[i + 1] in o && o[m[i + 1]] > 0) printf "%-11s %7.3f GB/s  openssl %7.3f GB/s  ratio %.2f\n", m[i], t[m[i]], o[m[i + 1]], t[m[i]] / o[m[i + 1]]
            else printf "%-11s %7.3f GB/s  openssl n/a\n", m[i], t[m[i]]
        }
    }' "$out"
