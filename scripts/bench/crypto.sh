#!/usr/bin/env bash
# Keystream throughput on one core (criterion, benches/crypto.rs) beside `openssl speed`
# for the same ciphers and buffer sizes.
#   scripts/bench/crypto.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=3; [ "${1:-}" = --quick ] && secs=1
echo "== tdefs (RustCrypto aes + ctr; constant-time sm4, AES-NI path), median per call; 1 GiB/s = 1.074 GB/s"
cargo bench --quiet --bench crypto -- --warm-up-time 1 --measurement-time "$secs" 2>/dev/null \
    | awk '/^keystream\// {name=$1} /thrpt:/ && name {print name, $4, $5; name=""}'
echo "== openssl speed (single core; figures in kB/s of 1000 bytes)"
for c in aes-128-ctr aes-256-ctr sm4-ctr; do
    openssl speed -evp "$c" -bytes 4096 -seconds "$secs" 2>/dev/null | tail -1
    openssl speed -evp "$c" -bytes 65536 -seconds "$secs" 2>/dev/null | tail -1
done
