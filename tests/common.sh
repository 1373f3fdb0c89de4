# Helpers for the numbered tests under tests/<suite>/NNN, in the spirit of xfstests' common/rc.
# scripts/check sources this file and exports:
#   TEST_DIR      the tdefs mountpoint (mounted when the test starts)
#   BACKING       the backing directory
#   SCRATCH       a scratch directory outside the mount, kept when the test fails
#   TDEFS         the tdefs binary; TOOLS: directory of the test tools (tdefs-fsx, ...)
#   TDEFS_CONFIG  the config the mount uses
#   POWERCUT_CTL  control socket of the power-cut simulator (backing: powercut tests)
# A test prints its results on stdout (compared with NNN.out), exits 0 when it ran,
# 77 (via _notrun) when it cannot run here (a failure, unless tests/allowed-skips lists it).
# It runs under bash with `set -u -o pipefail`; its stderr must be empty but for lines
# matching one of its `# stderr: REGEX` header lines.

# _native: true when scripts/check --native runs the test on a plain host directory
# (no tdefs; _mount, _unmount, _remount and _kill_tdefs do nothing).
_native() {
    [ "${TDEFS_NATIVE:-0}" = 1 ]
}

_notrun() {
    echo "$*" > "$SCRATCH/notrun"
    exit 77
}

_fail() {
    echo "FAIL: $*"
    exit 1
}

# _require CMD...: the test does not run without these programs.
_require() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || _notrun "$c is not installed"
    done
}

# Mounted, alive or dead (mountpoint(1) stats the path, which fails on a dead FUSE mount).
_is_mounted() {
    awk -v m="$TEST_DIR" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

_tdefs_pid() {
    cat "$SCRATCH/tdefs.pid" 2>/dev/null
}

# _mount [ARGS...]: start tdefs (foreground, in the background) and wait for the mount.
# A waiter records the daemon's exit status in $SCRATCH/daemon-PID.exit (every daemon a test
# started is listed in $SCRATCH/daemons): after the test, scripts/check requires each to
# have exited 0, unless _kill_tdefs killed it on purpose.
_mount() {
    _native && return 0
    rm -f "$SCRATCH/tdefs.pid"
    (
        "$TDEFS" mount --config "$TDEFS_CONFIG" "$@" >>"$SCRATCH/tdefs.log" 2>&1 &
        pid=$!
        echo "$pid" >> "$SCRATCH/daemons"
        echo "$pid" > "$SCRATCH/tdefs.pid.new" && mv "$SCRATCH/tdefs.pid.new" "$SCRATCH/tdefs.pid"
        wait "$pid"
        echo $? > "$SCRATCH/daemon-$pid.exit"
    ) </dev/null >/dev/null 2>&1 &
    local i pid=""
    for i in $(seq 1 600); do
        [ -n "$pid" ] || pid=$(_tdefs_pid)
        _is_mounted && [ -n "$pid" ] && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "tdefs exited instead of mounting:"; tail -5 "$SCRATCH/tdefs.log"; return 1
        fi
        sleep 0.05
    done
    echo "mount did not appear"
    return 1
}

_wait_gone() {
    local pid=$1 i
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || return 0
        # A zombie has finished (its waiter collects it).
        case "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null)" in Z*) return 0 ;; esac
        sleep 0.05
    done
    return 1
}

# _daemon_exit PID: the exit status the waiter recorded for daemon PID (empty if none yet).
_daemon_exit() {
    local i
    for i in $(seq 1 100); do
        [ -s "$SCRATCH/daemon-$1.exit" ] && { cat "$SCRATCH/daemon-$1.exit"; return 0; }
        sleep 0.05
    done
}

# _unmount: clean unmount with `tdefs umount`, which waits until the daemon closed the
# backing directory cleanly; fails if it did not, or if the daemon did not exit 0.
_unmount() {
    _native && return 0
    local pid; pid=$(_tdefs_pid)
    local i out
    # Something that just closed a file on the mount may still hold it for a moment: retry
    # "busy" a little.
    for i in $(seq 1 20); do
        out=$("$TDEFS" umount "$TEST_DIR" 2>&1) && break
        case "$out" in *busy*) sleep 0.1 ;; *) echo "tdefs umount: $out"; return 1 ;; esac
    done
    _is_mounted && { echo "tdefs umount: $out"; return 1; }
    [ -z "$pid" ] && return 0
    _wait_gone "$pid" || { echo "tdefs did not exit after unmount"; return 1; }
    local st; st=$(_daemon_exit "$pid")
    [ "$st" = 0 ] || { echo "tdefs exited with status ${st:-unknown} after unmount"; return 1; }
    rm -f "$SCRATCH/tdefs.pid"
}

_remount() {
    _unmount && _mount "$@"
}

# _kill_tdefs: SIGKILL the daemon (a crash) and clean up the dead mount. The kill is
# recorded ($SCRATCH/daemons.killed), so scripts/check expects that daemon's death.
_kill_tdefs() {
    _native && return 0
    local pid; pid=$(_tdefs_pid)
    [ -n "$pid" ] && echo "$pid" >> "$SCRATCH/daemons.killed"
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    [ -n "$pid" ] && _wait_gone "$pid"
    while _is_mounted; do fusermount3 -u -z "$TEST_DIR" 2>/dev/null; sleep 0.02; done
    rm -f "$SCRATCH/tdefs.pid"
}

# _powercut_cmd CMD: talk to the power-cut simulator.
_powercut_cmd() {
    python3 - "$POWERCUT_CTL" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((sys.argv[2] + "\n").encode()); s.shutdown(socket.SHUT_WR)
print(s.makefile().readline().strip())
PY
}

# _powercut_mode: the simulator's mode (strict: a name is durable once its directory is
# fsynced; ext4: once anything is fsynced after it).
_powercut_mode() {
    local r; r=$(_powercut_cmd mode)
    case "$r" in "ok "*) echo "${r#ok }" ;; *) _fail "powercut mode: $r" ;; esac
}

# _power_cut: the daemon dies and everything not durable is lost: data not fsynced, and
# names (create, rename, unlink, ...) whose directory was not fsynced since (strict mode).
_power_cut() {
    [ -n "${POWERCUT_CTL:-}" ] || _fail "_power_cut needs '# backing: powercut'"
    _kill_tdefs
    local r; r=$(_powercut_cmd cut)
    case "$r" in ok*) ;; *) _fail "power cut: $r" ;; esac
}

# _marker NAME: a unique plaintext string to embed in data; after the test the backing
# directory is scanned for it (it must appear in no encrypted file).
_marker() {
    local m="TDEFS-MARKER-$1-$RANDOM$RANDOM"
    echo "$m" >> "$SCRATCH/markers"
    echo "$m"
}

# _scan_pattern TEXT: also scan the backing directory for TEXT after the test.
_scan_pattern() {
    echo "$1" >> "$SCRATCH/markers"
}

# _as_user CMD...: run as the unprivileged test user (nobody).
_as_user() {
    setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
}

# _sha FILE: content hash.
_sha() {
    sha256sum "$1" | cut -c1-16
}

# _filter_xfs_io: drop xfs_io's byte counts and timings, keep the data.
_filter_xfs_io() {
    grep -vE '^(read|wrote) [0-9]+/[0-9]+ bytes at offset|^[0-9.]+ [KMGT]?i?B, [0-9]+ ops|^[0-9.]+ bytes, [0-9]+ ops'
}

# PostgreSQL helpers: a cluster in $TEST_DIR/pg, owned by postgres, socket in $SCRATCH/pgsock.
# The binaries of the newest installed version (Debian installs its default version under
# /usr/lib/postgresql/N/bin), unless $PGBIN says otherwise.
_pg_bindir() {
    local d best=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/initdb" ] && best=$d
    done
    echo "$best"
}
PGBIN=${PGBIN:-$(_pg_bindir)}
_pg_require() {
    [ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || _notrun "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)"
    id postgres >/dev/null 2>&1 || _notrun "no postgres user"
    chmod 1777 "$TEST_DIR"
    mkdir -p "$SCRATCH/pgsock"; chown postgres "$SCRATCH/pgsock"
    touch "$SCRATCH/pg.log"; chown postgres "$SCRATCH/pg.log"
    PGPORT=$(( 20000 + RANDOM % 20000 ))
}
_pg() {
    runuser -u postgres -- "$@"
}
_pg_initdb() {
    mkdir -p "$TEST_DIR/pg" && chown postgres "$TEST_DIR/pg" && chmod 700 "$TEST_DIR/pg"
    # initdb fsyncs pg/ and everything below it, not the directory holding pg/: that name
    # needs its own fsync to survive a power cut (POSIX; the strict simulator holds us to it).
    sync "$TEST_DIR"
    _pg "$PGBIN/initdb" -D "$TEST_DIR/pg" --no-instructions >"$SCRATCH/initdb.log" 2>&1 || { tail -5 "$SCRATCH/initdb.log"; return 1; }
}
_pg_start() {
    _pg "$PGBIN/pg_ctl" -D "$TEST_DIR/pg" -w -t 120 -l "$SCRATCH/pg.log" \
        -o "-p $PGPORT -k $SCRATCH/pgsock -c listen_addresses='' -c shared_buffers=64MB -c fsync=on -c full_page_writes=on" \
        start >/dev/null || { tail -20 "$SCRATCH/pg.log"; return 1; }
    # The postmaster's pid, outside the mount (readable after tdefs died).
    head -1 "$TEST_DIR/pg/postmaster.pid" > "$SCRATCH/pg.pid"
}
_pg_stop() {
    _pg "$PGBIN/pg_ctl" -D "$TEST_DIR/pg" -m "${1:-fast}" -w -t 120 stop >/dev/null
}
# _pg_kill: SIGKILL every postgres process of this cluster (a crash of the database); works
# after tdefs died too (the postmaster's pid is kept outside the mount by _pg_start).
_pg_kill() {
    local pid; pid=$(cat "$SCRATCH/pg.pid" 2>/dev/null)
    [ -n "$pid" ] || pid=$(head -1 "$TEST_DIR/pg/postmaster.pid" 2>/dev/null)
    [ -n "$pid" ] || return 0
    # Stop the postmaster first: between listing its children and its own death it could
    # fork one more backend, which would survive and wait forever for a lock a killed one held.
    kill -STOP "$pid" 2>/dev/null; pkill -9 -P "$pid" 2>/dev/null; kill -9 "$pid" 2>/dev/null
    local i; for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    pkill -9 -f "postgres.*-D $TEST_DIR/pg" 2>/dev/null || true
    sleep 0.2
}
_psql() {
    _pg "$PGBIN/psql" -h "$SCRATCH/pgsock" -p "$PGPORT" -X -q -t -A -v ON_ERROR_STOP=1 "$@"
}
_pgbench() {
    _pg "$PGBIN/pgbench" -h "$SCRATCH/pgsock" -p "$PGPORT" "$@"
}
_pg_amcheck() {
    _pg "$PGBIN/pg_amcheck" -h "$SCRATCH/pgsock" -p "$PGPORT" --all --heapallindexed --install-missing "$@"
}
