# Sourced by the scripts that mount a throwaway tdefs (package test, benchmarks, profiles):
# the smallest config, with a key file.
#   tdefs_config BACKING MOUNTPOINT KEYFILE METHOD [TOP-LEVEL-LINE...] > FILE
tdefs_config() {
    local backing=$1 mnt=$2 key=$3 method=$4 line
    shift 4
    printf 'backing-dir = "%s"\nmountpoint = "%s"\n' "$backing" "$mnt"
    for line in "$@"; do printf '%s\n' "$line"; done
    printf '[security.encryption]\ndata-encryption-method = "%s"\n' "$method"
    printf '[security.encryption.master-key]\ntype = "file"\npath = "%s"\n' "$key"
}
