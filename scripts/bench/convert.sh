#!/usr/bin/env bash
# Online conversion under load (issue 18): a PostgreSQL cluster made before tdefs (in the
# backing directory, then mounted with --init: plaintext) is served through tdefs (aes256-xts)
# and converted online while pgbench runs. For each rate limit: pgbench tps before,
# during and after the conversion, the conversion's own rate, and during/before. Prints a
# Markdown table (and writes it to OUT/convert.md).
#
#   scripts/bench/convert.sh [--rates "0 50M 10M"] [--scale N] [--secs N] [--share P] [--out DIR] [--dir WORKDIR]
#   --rates   rate limits to try (0: none); default "0 50M 10M"
#   --scale   pgbench scale of the cluster (default 20: about 320 MB)
#   --secs    pgbench seconds before and after (default 20); "during" lasts as long as the
#             conversion does (at least 5 s)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/config.sh
ROOT=$PWD
rates="0 50M 10M"; scale=20; secs=20; share=100; out=$ROOT/target/bench; base=/var/tmp
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) rates=$2; shift 2 ;;
        --scale) scale=$2; shift 2 ;;
        --secs) secs=$2; shift 2 ;;
        --share) share=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --dir) base=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (mounts, postgres user)" >&2; exit 1; }
scripts/install-deps.sh bench
scripts/lib/build.sh || exit 1
T=$ROOT/target/release/tdefs
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
mkdir -p "$out"
work=$(mktemp -d "$base/tdefs-convert.XXXXXX")
chmod 755 "$work"
port=$(( 30000 + RANDOM % 10000 ))
pg() { su postgres -c "$*"; }
bench() { # SECONDS -> tps
    pg "$PGBIN/pgbench -h /tmp -p $port -n -c 4 -j 2 -T $1 postgres 2>/dev/null" | awk -F'= ' '/^tps/ {printf "%.0f", $2}'
}
cleanup() {
    pg "$PGBIN/pg_ctl -D $work/mnt/pg -m immediate stop" >/dev/null 2>&1 || true
    "$T" umount "$work/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
rows=()
for rate in $rates; do
    rm -rf "$work/b" "$work/mnt"; mkdir -p "$work/b/pg" "$work/mnt"; chown postgres "$work/b/pg"; chmod 700 "$work/b/pg"
    [ -f "$work/key" ] || "$T" genkey "$work/key" >/dev/null
    touch "$work/pg.log"; chown postgres "$work/pg.log"
    tdefs_config "$work/b" "$work/mnt" "$work/key" aes256-xts > "$work/t.toml"
    pg "$PGBIN/initdb -D $work/b/pg -N >/dev/null 2>&1"
    pg "$PGBIN/pg_ctl -D $work/b/pg -o '-p $port -k /tmp -c shared_buffers=128MB' -l $work/pg.log start -w >/dev/null"
    pg "$PGBIN/pgbench -h /tmp -p $port -i -s $scale postgres >/dev/null 2>&1"
    pg "$PGBIN/pg_ctl -D $work/b/pg -m fast stop -w >/dev/null"
    "$T" mount --config "$work/t.toml" --init --daemon --log-file "$work/tdefs.log"
    pg "$PGBIN/pg_ctl -D $work/mnt/pg -o '-p $port -k /tmp -c shared_buffers=128MB' -l $work/pg.log start -w >/dev/null"
    before=$(bench "$secs")
    "$T" convert start "$work/mnt" --rate "$rate" --io-share "$share" >/dev/null
    # pgbench in 5 s slices until the conversion is done: "during" is their weighted mean.
    n=0; sum=0
    while :; do
        v=$(bench 5); sum=$((sum + v)); n=$((n + 1))
        [ "$("$T" convert status "$work/mnt" --json)" = null ] && break
    done
    # From the daemon's log: the job's start and end.
    took=$(python3 - "$work/tdefs.log" <<'PY'
import datetime, sys
t = lambda l: datetime.datetime.fromisoformat(l.split()[0].replace("Z", "+00:00"))
lines = open(sys.argv[1]).read().splitlines()
start = [l for l in lines if "online conversion to" in l and "started" in l][-1]
end = [l for l in lines if "online conversion finished" in l][-1]
print(f"{(t(end) - t(start)).total_seconds():.1f}")
PY
)
    during=$((sum / n))
    # What the job selected (the files as they were when it started).
    bytes=$(grep -o 'files selected files=[0-9]* bytes=[0-9]*' "$work/tdefs.log" | tail -1 | sed 's/.*bytes=//')
    after=$(bench "$secs")
    pg "$PGBIN/pg_ctl -D $work/mnt/pg -m fast stop -w >/dev/null"
    "$T" umount "$work/mnt" >/dev/null
    label=$([ "$rate" = 0 ] && echo "none" || echo "$rate/s")
    rows+=("| $label | $(awk -v b="$bytes" -v t="$took" 'BEGIN { printf "%.1f MB/s, %.0f s", b / 1e6 / t, t }') | $before | $during | $after | $(awk -v d="$during" -v b="$before" 'BEGIN { printf "%.2f", d / b }') |")
    echo "rate $label: converted $bytes bytes in ${took}s; tps before $before, during $during, after $after" >&2
done
{
    echo "pgbench -c 4 -j 2, scale $scale, aes256-xts, io-share $share; $(date -u +%F), $(uname -r), $(nproc) CPUs"
    echo
    echo "| rate limit | conversion | tps before | tps during | tps after | during / before |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$out/convert.md"
