#!/usr/bin/env bash
# Mount an encrypted directory from config/quickstart.toml on this machine, from scratch:
# installs fuse3 if needed, builds tdefs, creates the directories and a master key.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh base
cargo build --release --quiet
bin=target/release/tdefs
root=/tmp/tdefs-quickstart
mkdir -p "$root/backing" "$root/mnt"
[ -f "$root/master.key" ] || "$bin" genkey "$root/master.key"
if mountpoint -q "$root/mnt"; then
    echo "already mounted at $root/mnt"
else
    "$bin" mount --config config/quickstart.toml --daemon --log-file "$root/tdefs.log"
fi
cat <<MSG

Encrypted directory mounted. Try:
  echo 'hello, database' > $root/mnt/hello.txt
  cat $root/mnt/hello.txt        # plaintext through the mount
  xxd $root/backing/hello.txt    # ciphertext of the same length on disk
Unmount with:  fusermount3 -u $root/mnt    (log: $root/tdefs.log)
MSG
