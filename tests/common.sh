# Helpers for the numbered tests under tests/<suite>/NNN, in the spirit of xfstests' common/rc.
# scripts/check sources this file and exports:
#   TEST_DIR      the tdefs mountpoint (mounted when the test starts)
#   BACKING       the backing directory
#   SCRATCH       a scratch directory outside the mount, kept when the test fails
#   TDEFS         the tdefs binary; TOOLS: directory of the test tools (tdefs-fsx, ...)
#   TDEFS_CONFIG  the config the mount uses
#   POWERCUT_CTL  control socket of the power-cut simulator (backing: powercut tests)
# A test prints its results on stdout (compared with NNN.out), exits 0 when it ran,
# 77 (via _notrun) when it cannot run here.

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

_is_mounted() {
    mountpoint -q "$TEST_DIR"
}

_tdefs_pid() {
    cat "$SCRATCH/tdefs.pid" 2>/dev/null
}

# _mount [ARGS...]: start tdefs (foreground, in the background) and wait for the mount.
_mount() {
    "$TDEFS" mount --config "$TDEFS_CONFIG" "$@" >>"$SCRATCH/tdefs.log" 2>&1 &
    echo $! > "$SCRATCH/tdefs.pid"
    local i
    for i in $(seq 1 600); do
        _is_mounted && return 0
        kill -0 "$(_tdefs_pid)" 2>/dev/null || { echo "tdefs exited instead of mounting:"; tail -5 "$SCRATCH/tdefs.log"; return 1; }
        sleep 0.05
    done
    echo "mount did not appear"
    return 1
}

_wait_gone() {
    local pid=$1 i
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
    return 1
}

# _unmount: clean unmount; fails if tdefs does not exit.
_unmount() {
    local pid; pid=$(_tdefs_pid)
    fusermount3 -u "$TEST_DIR" || return 1
    [ -z "$pid" ] || _wait_gone "$pid" || { echo "tdefs did not exit after unmount"; return 1; }
}

_remount() {
    _unmount && _mount "$@"
}

# _kill_tdefs: SIGKILL the daemon (a crash) and clean up the dead mount.
_kill_tdefs() {
    local pid; pid=$(_tdefs_pid)
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

# _power_cut: the daemon dies and everything not fsynced is lost.
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
