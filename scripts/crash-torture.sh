#!/usr/bin/env bash
# Crash torture: kill -9 tdefs (and, in kill-both mode, the workload) mid-workload,
# remount, verify every durable operation. Prints a line per cycle, a summary line (durable
# operations, operations in flight, what the power cuts rolled back, the plaintext scan)
# and "torture: N passed, N failed".
#   scripts/crash-torture.sh [--cycles N] [--mode mixed|kill-fs|kill-both] [--method M] [--seed S]
#                            [--powercut [--powercut-mode strict|ext4]] [--min-durable-per-cycle N]
# --powercut puts the power-cut simulator under the backing directory and cuts power after
# every kill, so that only what was fsynced (data) or made durable by a directory fsync
# (names; strict mode, the default) survives.
# The run fails below its floors: on average fewer than N durable operations per cycle
# (default 20), a cycle without one, and with --powercut a run in which no cut rolled back
# any file data or any namespace operation. The workload's stderr is kept in the work
# directory and shown for a failed cycle; the work directory is kept on failure.
# Defaults: 200 cycles, mixed modes, aes256-ctr, a random seed (printed, to replay a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles=200 mode=mixed method=aes256-ctr seed=$RANDOM powercut=() extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cycles) cycles=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --method) method=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --powercut) powercut=(--powercut target/release/tdefs-powercut); shift ;;
        --powercut-mode) export POWERCUT_MODE=$2; shift 2 ;;
        --min-durable-per-cycle) extra+=(--min-durable-per-cycle "$2"); shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
scripts/install-deps.sh base
scripts/lib/build.sh || exit 1
echo "crash torture: $cycles cycles, mode $mode, method $method, seed $seed ${powercut[*]:+(power cuts)}"
exec target/release/tdefs-torture run --tdefs target/release/tdefs --cycles "$cycles" --mode "$mode" --method "$method" --seed "$seed" ${powercut[@]+"${powercut[@]}"} ${extra[@]+"${extra[@]}"}
