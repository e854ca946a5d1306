# Sourced by deploy/bootstrap.sh and tests/setup.sh: apt-get as root, waiting for the dpkg lock.
#
# A fresh cloud machine often runs unattended-upgrades or cloud-init's apt at boot, holding the
# dpkg or the package lists lock for minutes: wait for it (10 min at most) rather than fail.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_get() {
    local err tries=60
    err="$(mktemp)"
    while true; do
        # DPkg::Lock::Timeout covers the dpkg lock; the lists lock of `update` needs the retry.
        if as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get -o DPkg::Lock::Timeout=10 "$@" 2>"$err"; then
            cat "$err" >&2  # warnings
            rm -f "$err"
            return 0
        fi
        if grep -qiE 'could not get lock|unable to acquire|is another process using it' "$err" \
                && [ "$tries" -gt 0 ]; then
            [ "$tries" = 60 ] && echo "waiting for another apt/dpkg (unattended-upgrades?) to finish..." >&2
            tries=$((tries - 1))
            sleep "${CHARON_APT_RETRY_SECONDS:-10}"
            continue
        fi
        cat "$err" >&2
        rm -f "$err"
        return 1
    done
}
