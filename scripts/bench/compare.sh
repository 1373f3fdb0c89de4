#!/usr/bin/env bash
# Side-by-side benchmark (issue 6): native directory, tdefs plaintext / aes128-ctr /
# aes256-ctr / aes256-xts / sm4-ctr, and gocryptfs, on the same disk, alternating, several repetitions,
# medians. tdefs configurations run over /dev/fuse; those named tdefs-METHOD-uring run over
# FUSE-over-io_uring (issue 19; the fuse module's enable_uring is turned on for the run). Writes OUT/raw.tsv, OUT/results.md (absolute figures and ratios) and
# OUT/results.png (ratios to native).
#
#   scripts/bench/compare.sh [--quick] [--reps N] [--out DIR] [--dir WORKDIR] [--configs "a b"]
#   --quick     tiny sizes, one repetition: checks that the harness works (CI runs this)
#   --reps N    repetitions of every job in every configuration (default 3)
#   --dir D     where the backing directories go (default /var/tmp; same disk for all)
# Environment: RT (fio seconds per job, default 10), SIZE (fio file size, default 512M),
# PGT (pgbench seconds, default 30), FILES (small files, default 50000).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/config.sh
ROOT=$PWD
reps=3; out=$ROOT/target/bench; base=/var/tmp; quick=0; configs_given=0
configs="native tdefs-plaintext tdefs-aes128 tdefs-aes256 tdefs-aes256-uring tdefs-aes256xts tdefs-aes256xts-uring tdefs-sm4 gocryptfs"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; shift ;;
        --reps) reps=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --dir) base=$2; shift 2 ;;
        --configs) configs=$2; configs_given=1; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ $quick = 1 ]; then
    reps=1; RT=${RT:-1}; SIZE=${SIZE:-16M}; PGT=${PGT:-3}; FILES=${FILES:-2000}; PGSCALE=1; ROWS=2000
    [ "$configs_given" = 1 ] || configs="native tdefs-aes256 tdefs-aes256-uring gocryptfs"
fi
RT=${RT:-10}; SIZE=${SIZE:-512M}; PGT=${PGT:-30}; FILES=${FILES:-50000}; PGSCALE=${PGSCALE:-10}; ROWS=${ROWS:-20000}
[ "$(id -u)" = 0 ] || { echo "run as root (mounts, postgres user)" >&2; exit 1; }
scripts/install-deps.sh bench
scripts/lib/build.sh || exit 1
T=$ROOT/target/release
PGBIN=/usr/lib/postgresql/15/bin
mkdir -p "$out"
work=$(mktemp -d "$base/tdefs-bench.XXXXXX")
chmod 755 "$work"
# FUSE over io_uring for the -uring configurations, the module parameter as it was after.
uring_param=/sys/module/fuse/parameters/enable_uring
uring_was=
case " $configs " in *-uring\ *)
    [ -w $uring_param ] || { echo "this kernel has no FUSE over io_uring ($uring_param): drop the -uring configurations" >&2; exit 1; }
    uring_was=$(cat $uring_param); echo Y > $uring_param ;;
esac
cleanup() {
    [ -z "$uring_was" ] || echo "$uring_was" > $uring_param
    for m in "$work"/*/mnt; do fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
raw=$out/raw.tsv
: > "$raw"

# ---------- environment ----------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "kernel: $(uname -r)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|vaes|avx2|avx512f|sse4_2|pclmulqdq|sha_ni' | tr '\n' ' ')"
    echo "disk: $(df -h "$base" | awk 'NR==2 {print $1, $2}') ($(findmnt -no FSTYPE -T "$base"))"
    echo "tdefs: $($T/tdefs --version)"
    echo "gocryptfs: $(gocryptfs -version 2>/dev/null | head -1)"
    echo "fio: $(fio --version)"
    echo "postgresql: $($PGBIN/postgres --version)"
    echo "sqlite: $(sqlite3 --version | cut -d' ' -f1)"
    echo "openssl: $(openssl version)"
    echo "parameters: reps=$reps fio runtime=${RT}s size=$SIZE pgbench scale=$PGSCALE -c4 -j2 -T$PGT files=$FILES sqlite rows=$ROWS"
} | tee "$out/env.txt"

# A source tree to untar: the system's C headers (thousands of small files).
tarball=$work/tree.tar
tar -C /usr -cf "$tarball" include 2>/dev/null
tar_files=$(tar -tf "$tarball" | grep -vc '/$')

# ---------- mounting ----------
mount_config() { # CONFIG -> prints the directory to use
    local c=$1 d=$work/$1
    rm -rf "$d"; mkdir -p "$d/backing" "$d/mnt"; chmod 755 "$d" "$d/mnt"
    case $c in
        native) echo "$d/backing"; return ;;
        gocryptfs)
            gocryptfs -q -init -extpass "echo bench-password" -scryptn 10 "$d/backing" >/dev/null
            gocryptfs -q -extpass "echo bench-password" -allow_other "$d/backing" "$d/mnt"
            ;;
        tdefs-*)
            local method=${c#tdefs-} transport=off
            case $method in *-uring) method=${method%-uring}; transport=on ;; esac
            case $method in plaintext) ;; aes128) method=aes128-ctr ;; aes256) method=aes256-ctr ;; sm4) method=sm4-ctr ;;
                aes256xts) method=aes256-xts ;; sm4xts) method=sm4-xts ;; esac
            "$T/tdefs" genkey "$d/key" >/dev/null 2>&1
            tdefs_config "$d/backing" "$d/mnt" "$d/key" "$method" > "$d/tdefs.toml"
            TDEFS_IO_URING=$transport "$T/tdefs" mount --config "$d/tdefs.toml" --daemon --log-file "$d/tdefs.log" 2>/dev/null
            ;;
    esac
    echo "$d/mnt"
}

unmount_config() {
    local c=$1 d=$work/$1
    [ "$c" = native ] || fusermount3 -u "$d/mnt"
    for _ in $(seq 1 100); do mountpoint -q "$d/mnt" || break; sleep 0.1; done
    rm -rf "$d"
}

daemon_pid() { # CONFIG: the process serving its mount
    case $1 in
        tdefs-*) pgrep -f -- "$work/$1/tdefs.toml" | head -1 ;;
        gocryptfs) pgrep -f -- "gocryptfs.*$work/$1/mnt" | head -1 ;;
    esac
}

record() { # rep config job value
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$raw"
    printf '  %-16s %-22s %s\n' "$2" "$3" "$4"
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# ---------- jobs ----------
fio_job() { # dir name field fio-args...   field: rbw wbw riops wiops iops
    local dir=$1 name=$2 field=$3; shift 3
    rm -f "$dir/fio.$name"*
    local line
    line=$(fio --name="$name" --directory="$dir" --filename="fio.$name" --size="$SIZE" --runtime="$RT" \
        --time_based=1 --ioengine=psync --numjobs=1 --group_reporting --output-format=terse --terse-version=3 \
        "$@" 2>/dev/null | tail -1)
    rm -f "$dir/fio.$name"*
    # terse v3: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS
    echo "$line" | awk -F';' -v f="$field" '{
        if (f == "rbw") printf "%.1f", $7/1024; else if (f == "wbw") printf "%.1f", $48/1024;
        else if (f == "riops") print $8; else if (f == "wiops") print $49; else print $8 + $49 }'
}

run_jobs() { # rep config dir
    local rep=$1 c=$2 dir=$3 t0 t1 v
    record "$rep" "$c" "seqwrite_1M_MBps" "$(fio_job "$dir" seqwrite wbw --rw=write --bs=1M --end_fsync=1)"
    # Lay the file out, drop caches, read it cold.
    fio --name=lay --directory="$dir" --filename=fio.seqread --size="$SIZE" --rw=write --bs=1M --end_fsync=1 >/dev/null 2>&1
    drop_caches
    record "$rep" "$c" "seqread_1M_MBps" "$(fio_job "$dir" seqread rbw --rw=read --bs=1M)"
    record "$rep" "$c" "append_512B_MBps" "$(fio_job "$dir" append512 wbw --rw=write --bs=512 --end_fsync=1)"
    record "$rep" "$c" "append_512B_fdatasync64_MBps" "$(fio_job "$dir" append512s wbw --rw=write --bs=512 --fdatasync=64)"
    record "$rep" "$c" "randread_4K_IOPS" "$(fio_job "$dir" randread4k riops --rw=randread --bs=4k)"
    record "$rep" "$c" "randwrite_4K_IOPS" "$(fio_job "$dir" randwrite4k wiops --rw=randwrite --bs=4k --end_fsync=1)"
    record "$rep" "$c" "randwrite_8K_fsync32_IOPS" "$(fio_job "$dir" randwrite8k wiops --rw=randwrite --bs=8k --fsync=32)"
    record "$rep" "$c" "randrw_8K_70_30_IOPS" "$(fio_job "$dir" randrw8k iops --rw=randrw --bs=8k --rwmixread=70)"
    record "$rep" "$c" "odirect_randwrite_8K_IOPS" "$(fio_job "$dir" odirect8k wiops --rw=randwrite --bs=8k --direct=1)"
    # Metadata: small files, untar, rm -rf.
    v=$("$T/tdefs-bench" create-rate --dir "$dir/small" --threads 4 --files "$FILES" | sed -n 's/.*files_per_s=\([0-9]*\).*/\1/p')
    record "$rep" "$c" "create_small_files_per_s" "$v"
    rm -rf "$dir/small"
    t0=$(date +%s.%N); tar -C "$dir" -xf "$tarball"; sync -f "$dir/include"; t1=$(date +%s.%N)
    record "$rep" "$c" "untar_files_per_s" "$(echo "$tar_files / ($t1 - $t0)" | bc -l | xargs printf '%.0f')"
    t0=$(date +%s.%N); rm -rf "$dir/include"; t1=$(date +%s.%N)
    record "$rep" "$c" "rm_rf_files_per_s" "$(echo "$tar_files / ($t1 - $t0)" | bc -l | xargs printf '%.0f')"
    # SQLite: many small committed transactions (WAL, synchronous=FULL).
    v=$(/usr/bin/python3 - "$dir/bench.db" "$ROWS" <<'PY'
import sqlite3, sys, time, os
path, rows = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)")
payload = "x" * 200
t = time.time()
for i in range(0, rows, 10):
    db.execute("BEGIN")
    for j in range(i, i + 10):
        db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (j * 7919 % rows, payload))
    db.execute("COMMIT")
print(int(rows / (time.time() - t)))
PY
)
    record "$rep" "$c" "sqlite_inserts_per_s" "$v"
    rm -f "$dir"/bench.db*
    # pgbench, as the postgres user; the daemon's peak RSS is sampled meanwhile.
    local pg=$dir/pg port=$((15432 + RANDOM % 1000)) rss=0 pid
    mkdir -p "$pg"; chown postgres "$pg"
    su postgres -c "$PGBIN/initdb -D $pg/data -N >/dev/null 2>&1"
    su postgres -c "$PGBIN/pg_ctl -D $pg/data -o '-p $port -k /tmp -c shared_buffers=128MB' -l $pg/pg.log start -w >/dev/null"
    su postgres -c "$PGBIN/pgbench -h /tmp -p $port -i -s $PGSCALE postgres >/dev/null 2>&1"
    pid=$(daemon_pid "$c")
    ( while sleep 1; do [ -n "$pid" ] && awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null; done ) > "$work/rss" &
    local sampler=$!
    v=$(su postgres -c "$PGBIN/pgbench -h /tmp -p $port -c 4 -j 2 -T $PGT postgres 2>/dev/null" | awk -F'= ' '/^tps/ {print int($2)}')
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null || true
    record "$rep" "$c" "pgbench_tps" "$v"
    [ "$c" = native ] || record "$rep" "$c" "daemon_rss_MiB_pgbench" "$(sort -n "$work/rss" | tail -1 | awk '{printf "%.0f", $1/1024}')"
    su postgres -c "$PGBIN/pg_ctl -D $pg/data stop -m fast >/dev/null"
    rm -rf "$pg"
}

# ---------- run: configurations alternate, order rotates per repetition ----------
read -ra cl <<< "$configs"
n=${#cl[@]}
for rep in $(seq 1 "$reps"); do
    for i in $(seq 0 $((n - 1))); do
        c=${cl[$(( (i + rep - 1) % n ))]}
        echo "== repetition $rep/$reps: $c"
        dir=$(mount_config "$c")
        run_jobs "$rep" "$c" "$dir"
        unmount_config "$c"
    done
done

# ---------- summary ----------
/usr/bin/python3 - "$raw" "$out" "$configs" <<'PY'
import sys, statistics, collections
raw, out, configs = sys.argv[1], sys.argv[2], sys.argv[3].split()
vals = collections.defaultdict(list)
jobs = []
for line in open(raw):
    rep, c, job, v = line.rstrip("\n").split("\t")
    if job not in jobs: jobs.append(job)
    try: vals[(c, job)].append(float(v))
    except ValueError: pass
med = {k: statistics.median(v) for k, v in vals.items() if v}
def ratio(a, b, job):
    if (a, job) in med and (b, job) in med and med[(b, job)] > 0:
        r = med[(a, job)] / med[(b, job)]
        return f"{r:.2f}"
    return "–"
cols = [c for c in configs]
hdr = "| job | " + " | ".join(cols) + " | aes256 / native | aes256 / gocryptfs | aes256 / plaintext | xts / ctr (aes256) | aes256 uring / native | aes256 uring / dev-fuse | xts uring / dev-fuse |"
lines = [hdr, "|" + "---|" * (len(cols) + 8)]
for job in jobs:
    cells = [f"{med[(c, job)]:.0f}" if (c, job) in med and med[(c, job)] >= 10 else (f"{med[(c, job)]:.1f}" if (c, job) in med else "–") for c in cols]
    if job.startswith("daemon_rss"):
        r = ["–"] * 7
    else:
        r = [ratio("tdefs-aes256", "native", job), ratio("tdefs-aes256", "gocryptfs", job), ratio("tdefs-aes256", "tdefs-plaintext", job),
             ratio("tdefs-aes256xts", "tdefs-aes256", job), ratio("tdefs-aes256-uring", "native", job),
             ratio("tdefs-aes256-uring", "tdefs-aes256", job), ratio("tdefs-aes256xts-uring", "tdefs-aes256xts", job)]
    lines.append(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(r) + " |")
md = "\n".join(lines) + "\n"
env = open(f"{out}/env.txt").read()
open(f"{out}/results.md", "w").write("Medians; higher is better except daemon RSS.\n\n" + md + "\n```\n" + env + "```\n")
print(md)
# Chart data: ratio to native per job and configuration.
with open(f"{out}/ratios.dat", "w") as f:
    f.write("job " + " ".join(c for c in cols if c != "native") + "\n")
    for job in jobs:
        if job.startswith("daemon_rss"): continue
        row = [ratio(c, "native", job).replace("–", "0") for c in cols if c != "native"]
        f.write(job + " " + " ".join(row) + "\n")
PY
if command -v gnuplot >/dev/null; then
    ncols=$(head -1 "$out/ratios.dat" | wc -w)
    gnuplot <<GP
set terminal png size 1400,600 font ",10" noenhanced
set output "$out/results.png"
set title "tdefs vs gocryptfs, throughput relative to native ext4 (median of $reps runs, $(date -u +%Y-%m-%d))"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel "ratio to native (higher is better)"
set xtics rotate by -30
set key outside top center horizontal
set grid ytics
plot for [i=2:$ncols] "$out/ratios.dat" using i:xtic(1) title columnheader(i)
GP
    echo "chart: $out/results.png"
fi
echo "results: $out/results.md"
