#!/usr/bin/env bash
# Score the sandboxing of nomadscale's systemd unit with `systemd-analyze security`.
#
#   scripts/systemd-security.sh [UNIT_FILE]      (default: deploy/systemd/nomadscale.service)
#
# Installs Debian's systemd package (for systemd-analyze) when it is missing, waits up to
# NOMADSCALE_UNIT_WAIT_S seconds (default 0) for the unit file to appear, runs the offline
# analysis (systemd >= 250) and prints the exposure score (0 = locked down, 10 = exposed) and
# the checks that still count against it. Exit status: that of systemd-analyze, 0 when the
# overall exposure is within --threshold (NOMADSCALE_EXPOSURE_MAX, default 10 = report only).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="${1:-$root/deploy/systemd/nomadscale.service}"
wait_s="${NOMADSCALE_UNIT_WAIT_S:-0}"
threshold="${NOMADSCALE_EXPOSURE_MAX:-100}"  # systemd-analyze takes 0..100 (= 0.0..10.0)

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "systemd-analyze not found; run as root to install Debian's systemd package" >&2
        exit 2
    fi
    echo "installing systemd (for systemd-analyze)..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

for _ in $(seq 1 "$wait_s"); do
    [ -f "$unit" ] && break
    sleep 1
done
if [ ! -f "$unit" ]; then
    echo "unit file not found: $unit" >&2
    exit 2
fi

version="$(systemd-analyze --version | awk 'NR==1 {print $2}')"
if [ "${version:-0}" -lt 250 ]; then
    echo "systemd $version: --offline needs systemd >= 250" >&2
    exit 2
fi

# --offline reads the unit file as written; the unit need not be installed or loaded.
out="$(systemd-analyze security --offline=true --no-pager --threshold="$threshold" "$unit" 2>&1)" \
    && status=0 || status=$?
echo "$out" | grep -E '^[[:space:]]*✗' || true
score="$(echo "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' | tail -1)"
level="$(echo "$out" | sed -n 's/.*Overall exposure level for [^:]*: [0-9.]* \(.*\)$/\1/p' | tail -1)"
if [ -z "$score" ]; then
    echo "$out" >&2
    echo "could not read the exposure score" >&2
    exit "${status:-1}"
fi
echo "exposure score: $score ${level} (systemd $version, $(basename "$unit"))"
exit "$status"
