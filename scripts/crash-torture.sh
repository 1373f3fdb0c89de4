#!/usr/bin/env bash
# Crash torture: kill -9 tdefs (and, in kill-both mode, the workload) mid-workload,
# remount, verify every durable operation. Prints cycles run and failures.
#   scripts/crash-torture.sh [--cycles N] [--mode mixed|kill-fs|kill-both] [--method M] [--seed S] [--powercut]
# --powercut puts the power-cut simulator under the backing directory and cuts power after
# every kill, so that only what was fsynced survives.
# Defaults: 200 cycles, mixed modes, aes256-ctr, a random seed (printed, to replay a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles=200 mode=mixed method=aes256-ctr seed=$RANDOM powercut=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cycles) cycles=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --method) method=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --powercut) powercut=(--powercut target/release/tdefs-powercut); shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
scripts/install-deps.sh base
cargo build --release --quiet --bin tdefs --bin tdefs-torture --bin tdefs-powercut
echo "crash torture: $cycles cycles, mode $mode, method $method, seed $seed ${powercut[*]:+(power cuts)}"
exec target/release/tdefs-torture run --tdefs target/release/tdefs --cycles "$cycles" --mode "$mode" --method "$method" --seed "$seed" "${powercut[@]}"
