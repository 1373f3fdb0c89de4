#!/usr/bin/env bash
# Where the time goes under pgbench on tdefs (issue 6).
#
# Runs pgbench (scale 10, 4 clients) on a tdefs mount while `perf record -a -g` samples the
# whole machine, and scrapes the mount's metrics before and after. Prints:
#   - FUSE requests per pgbench transaction, by operation (from tdefs_requests_total);
#   - CPU split by process (postgres, tdefs threads, kernel idle...);
#   - the tdefs daemon's hottest functions (kernel and user);
# and writes OUT/perf.data, OUT/report.txt and, when Brendan Gregg's FlameGraph scripts
# are available (FLAMEGRAPH=/path/to/FlameGraph), OUT/flamegraph.svg.
#
#   scripts/bench/profile.sh [--method aes256-ctr] [--seconds 20] [--out DIR] [--dir WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/config.sh
ROOT=$PWD
method=aes256-ctr; secs=20; out=$ROOT/target/profile; base=/var/tmp
while [ $# -gt 0 ]; do
    case "$1" in
        --method) method=$2; shift 2 ;;
        --seconds) secs=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --dir) base=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (mount, postgres user, perf -a)" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is not installed: apt-get install linux-perf" >&2; exit 1; }
scripts/install-deps.sh bench
scripts/lib/build.sh || exit 1
T=$ROOT/target/release
PGBIN=/usr/lib/postgresql/15/bin
mkdir -p "$out"
work=$(mktemp -d "$base/tdefs-profile.XXXXXX")
chmod 755 "$work"
port=$((16432 + RANDOM % 1000)); mport=$((19184 + RANDOM % 1000))
cleanup() {
    su postgres -c "$PGBIN/pg_ctl -D $work/mnt/pg stop -m immediate" >/dev/null 2>&1 || true
    fusermount3 -u "$work/mnt" 2>/dev/null || fusermount3 -u -z "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/backing" "$work/mnt"; chmod 755 "$work/mnt"
"$T/tdefs" genkey "$work/key" >/dev/null 2>&1
tdefs_config "$work/backing" "$work/mnt" "$work/key" "$method" "metrics-addr = \"127.0.0.1:$mport\"" > "$work/tdefs.toml"
"$T/tdefs" mount --config "$work/tdefs.toml" --daemon --log-file "$work/tdefs.log"
pid=$(pgrep -f -- "$work/tdefs.toml" | head -1)
mkdir "$work/mnt/pg" "$work/log"; chown postgres "$work/mnt/pg" "$work/log"
su postgres -c "$PGBIN/initdb -D $work/mnt/pg -N >/dev/null"
su postgres -c "$PGBIN/pg_ctl -D $work/mnt/pg -o '-p $port -k /tmp -c shared_buffers=128MB' -l $work/log/pg.log start -w >/dev/null"
su postgres -c "$PGBIN/pgbench -h /tmp -p $port -i -s 10 postgres >/dev/null 2>&1"
requests() { curl -s "http://127.0.0.1:$mport/metrics" | awk '/^tdefs_requests_total/ {split($1, a, "\""); print a[2], $2}' | sort; }
requests > "$work/req.before"
perf record -q -F 499 -a -g -o "$out/perf.data" -- sleep "$secs" 2>/dev/null &
perfpid=$!
tps=$(su postgres -c "$PGBIN/pgbench -h /tmp -p $port -c 4 -j 2 -T $secs postgres 2>/dev/null" | awk -F'= ' '/^tps/ {print int($2)}')
txns=$(su postgres -c "psql -h /tmp -p $port -Atc 'select count(*) from pgbench_history' postgres")
wait $perfpid || true
requests > "$work/req.after"
set +e +o pipefail # `head` closes the reports' pipes early
{
    echo "# tdefs profile: pgbench -c4 -j2 -T$secs, scale 10, on tdefs $method ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, kernel $(uname -r))"
    echo "tps: $tps   transactions: $txns"
    echo
    echo "## FUSE requests per transaction"
    join "$work/req.before" "$work/req.after" | awk -v t="$txns" '{d = $3 - $2; if (d > 0) printf "  %-12s %8.2f\n", $1, d / t}' | sort -k2 -rn
    echo
    echo "## CPU samples by process"
    perf report -i "$out/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12
    echo
    echo "## tdefs daemon (pid $pid): hottest functions"
    perf report -i "$out/perf.data" --no-children --pid "$pid" --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -25
} | tee "$out/report.txt"
if [ -n "${FLAMEGRAPH:-}" ] && [ -x "$FLAMEGRAPH/flamegraph.pl" ]; then
    perf script -i "$out/perf.data" 2>/dev/null | "$FLAMEGRAPH/stackcollapse-perf.pl" > "$out/stacks.folded"
    "$FLAMEGRAPH/flamegraph.pl" --title "pgbench on tdefs $method (whole machine)" "$out/stacks.folded" > "$out/flamegraph.svg"
    echo "flamegraph: $out/flamegraph.svg"
fi
