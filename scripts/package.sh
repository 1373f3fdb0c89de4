#!/usr/bin/env bash
# The Debian package: target/debian/tdefs_VERSION-1_amd64.deb (the stripped binary, the
# /usr/sbin/mount.fuse.tdefs link, the systemd unit, example configs, man pages, bash/zsh/fish
# completions) and tdefs-dbgsym_VERSION-1_amd64.ddeb (the debug info, split off by build id).
#
#   scripts/package.sh           # build both (uses target/release/tdefs; builds it if missing)
#   sudo dpkg -i target/debian/tdefs_*_amd64.deb
#   scripts/package.sh --test    # build, then install it, mount through an fstab line with the
#                                # installed helper, remount, unmount, uninstall; as root.
#                                # Prints "package: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/config.sh

test=false
case "${1:-}" in
    --test) test=true ;;
    "") ;;
    *) echo "usage: scripts/package.sh [--test]" >&2; exit 2 ;;
esac

scripts/lib/cargo-tools.sh deb || exit 1
scripts/lib/build.sh || exit 1
rm -rf target/assets target/debian
target/release/tdefs generate-assets target/assets
# The unit shipped in config/ is for a binary copied to /usr/local/bin; the package's is in /usr/bin.
sed 's|/usr/local/bin/tdefs|/usr/bin/tdefs|g' config/tdefs.service > target/assets/tdefs.service
cargo deb --no-build --dbgsym --quiet
deb=$(ls target/debian/tdefs_*_amd64.deb)
ddeb=$(ls target/debian/tdefs-dbgsym_*_amd64.ddeb)
echo "built $deb ($(du -h "$deb" | cut -f1)) and $ddeb ($(du -h "$ddeb" | cut -f1))"
$test || exit 0

[ "$(id -u)" = 0 ] || { echo "--test installs the package: run as root" >&2; exit 1; }
if dpkg-query -W -f='${Status}' tdefs 2>/dev/null | grep -q "install ok installed"; then
    echo "tdefs is already installed from a package here; the test installs and removes it: remove it first" >&2
    exit 1
fi

passed=0; failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
check() { local name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name"; fi; }

T=$(mktemp -d /var/tmp/tdefs-package.XXXXXX)
chmod 755 "$T"
installed=false
cleanup() {
    if mountpoint -q "$T/mnt" 2>/dev/null; then umount -l "$T/mnt" || true; fi
    if $installed; then dpkg --purge tdefs >/dev/null 2>&1 || true; fi
    rm -rf "$T"
}
trap cleanup EXIT

# The package's contents, before installing.
x="$T/extract"; mkdir "$x"; dpkg-deb -x "$deb" "$x"
check "binary at /usr/bin/tdefs" test -x "$x/usr/bin/tdefs"
check "mount helper link /usr/sbin/mount.fuse.tdefs -> ../bin/tdefs" test "$(readlink "$x/usr/sbin/mount.fuse.tdefs")" = ../bin/tdefs
if readelf -S "$x/usr/bin/tdefs" | grep -qE '\.debug_(info|line|str|abbrev)'; then bad "binary stripped" "it has debug info sections"; else ok "binary stripped ($(du -h "$x/usr/bin/tdefs" | cut -f1), $(du -h target/release/tdefs | cut -f1) unstripped)"; fi
id=$(readelf -n "$x/usr/bin/tdefs" | awk '/Build ID/ {print $3}')
dx="$T/dbgsym"; mkdir "$dx"; dpkg-deb -x "$ddeb" "$dx"
check "debug info in the dbgsym package under the binary's build id" test -s "$dx/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
check "systemd unit runs /usr/bin/tdefs" grep -q '^ExecStart=/usr/bin/tdefs mount' "$x/lib/systemd/system/tdefs.service"
check "example config" test -s "$x/usr/share/doc/tdefs/examples/tdefs.toml"
man=$(ls "$x"/usr/share/man/man1/ 2>/dev/null | tr '\n' ' ')
if [ -s "$x/usr/share/man/man1/tdefs.1.gz" ] && [ -s "$x/usr/share/man/man1/tdefs-mount.1.gz" ]; then ok "man pages: $man"; else bad "man pages tdefs(1), tdefs-mount(1)" "found: $man"; fi
check "bash completion" test -s "$x/usr/share/bash-completion/completions/tdefs"
check "zsh completion" test -s "$x/usr/share/zsh/vendor-completions/_tdefs"
check "fish completion" test -s "$x/usr/share/fish/vendor_completions.d/tdefs.fish"

# Installed.
if dpkg -i "$deb" >"$T/dpkg.log" 2>&1; then installed=true; ok "dpkg -i"; else bad "dpkg -i" "$(tail -3 "$T/dpkg.log")"; fi
check "tdefs --version from /usr/bin names the commit" sh -c '/usr/bin/tdefs --version | grep -q "^commit: [0-9a-f]"'
check "/sbin/mount.fuse.tdefs is the installed binary" test "$(readlink -f /sbin/mount.fuse.tdefs)" = /usr/bin/tdefs
check "bash completes the subcommands" bash -c '. /usr/share/bash-completion/completions/tdefs && COMP_WORDS=(tdefs mou) COMP_CWORD=1 && _tdefs tdefs mou tdefs && printf "%s\n" "${COMPREPLY[@]}" | grep -qx mount'
man_page=$(ls /usr/share/man/man1/tdefs-mount.1* 2>/dev/null | head -1)
check "man page tdefs-mount(1) documents --config" sh -c "{ zcat -f '$man_page'; } | grep -q -- 'config'"

# An fstab line through the installed helper (mount -T: this fstab instead of /etc/fstab).
mkdir "$T/backing" "$T/mnt"
/usr/bin/tdefs genkey "$T/master.key" 2>/dev/null
tdefs_config "$T/backing" "$T/mnt" "$T/master.key" aes256-xts > "$T/tdefs.toml"
echo "$T/tdefs.toml  $T/mnt  fuse.tdefs  defaults,nosuid,nodev,_netdev,nofail,log=$T/daemon.log  0 0" > "$T/fstab"
marker="tdefs-package-test-$$-plaintext-marker"
if mount -T "$T/fstab" "$T/mnt" 2>"$T/mount.err"; then ok "mount through the fstab line"; else bad "mount through the fstab line" "$(cat "$T/mount.err") $(tail -3 "$T/daemon.log" 2>/dev/null)"; fi
check "mounted as fuse.tdefs" test "$(findmnt -n -o FSTYPE "$T/mnt")" = fuse.tdefs
for i in $(seq 200); do echo "$marker $i"; done > "$T/mnt/data.txt" && sync
check "a file written through the mount" test -s "$T/backing/data.txt"
check "its backing file is ciphertext" sh -c "! grep -q '$marker' '$T/backing/data.txt'"
check "umount (tdefs umount waits for the daemon's clean close)" /usr/bin/tdefs umount "$T/mnt"
check "tdefs check after the unmount" /usr/bin/tdefs check --config "$T/tdefs.toml"
check "mount again through the fstab line" mount -T "$T/fstab" "$T/mnt"
check "the file reads back" sh -c "[ \"\$(sed -n 200p '$T/mnt/data.txt')\" = '$marker 200' ]"
check "umount (util-linux)" umount "$T/mnt"

# Uninstalled: nothing of it left.
if dpkg --purge tdefs >"$T/dpkg.log" 2>&1; then installed=false; ok "dpkg --purge"; else bad "dpkg --purge" "$(tail -3 "$T/dpkg.log")"; fi
check "binary and helper gone" sh -c '! test -e /usr/bin/tdefs && ! test -L /usr/sbin/mount.fuse.tdefs'

echo "package: $passed passed, $failed failed"
[ "$failed" = 0 ]
