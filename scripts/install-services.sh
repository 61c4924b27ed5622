#!/usr/bin/env bash
# Install the real services the test-suite runs against, without touching the system:
#   * Consul 1.8.7 from Debian *bullseye* (bookworm has no consul package), fetched through a
#     private apt configuration (own sources.list, state, lists and cache under the cache folder);
#     the system's apt sources and state are left as they are.
#   * Prometheus (+ promtool) from the system suite (bookworm).
# Both packages are only unpacked (`dpkg -x`) into the cache folder: nothing is installed in
# dpkg's database and no service is started.
#
# Usage (as root, or any user able to run apt-get download):
#   bash scripts/install-services.sh            # cache: ${NOMADSCALE_CACHE:-$HOME/.cache/nomadscale}
# Idempotent: exits at once when the binaries are already there.
set -euo pipefail

CACHE="${NOMADSCALE_CACHE:-$HOME/.cache/nomadscale}"
CONSUL_BIN="$CACHE/consul/usr/bin/consul"
PROM_BIN="$CACHE/prometheus/usr/bin/prometheus"
PROMTOOL_BIN="$CACHE/prometheus/usr/bin/promtool"
MIRROR="${NOMADSCALE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING="${NOMADSCALE_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"

report() {
  echo "consul:     $CONSUL_BIN"
  echo "prometheus: $PROM_BIN"
  echo "promtool:   $PROMTOOL_BIN"
}

if [[ -x "$CONSUL_BIN" && -x "$PROM_BIN" && -x "$PROMTOOL_BIN" ]]; then
  report
  exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "install-services: $tool not found (Debian needed)" >&2; exit 1; }
done
[[ -r "$KEYRING" ]] || { echo "install-services: $KEYRING missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

mkdir -p "$CACHE/debs"
WORK="$(mktemp -d "$CACHE/tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Unpack the newest downloaded .deb matching $1 into $2 (atomically: unpack aside, then move).
unpack() {
  local pattern="$1" dest="$2" deb
  deb="$(ls -1t "$CACHE"/debs/$pattern 2>/dev/null | head -n1)"
  [[ -n "$deb" ]] || { echo "install-services: no package matching $pattern downloaded" >&2; exit 1; }
  rm -rf "$dest.new"
  dpkg -x "$deb" "$dest.new"
  rm -rf "$dest"
  mv "$dest.new" "$dest"
}

# --- Consul from bullseye, through a private apt configuration ---------------------------
if [[ ! -x "$CONSUL_BIN" ]]; then
  APTDIR="$CACHE/apt-bullseye"
  mkdir -p "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" \
    "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial"
  echo "deb [signed-by=$KEYRING] $MIRROR bullseye main" >"$APTDIR/etc/sources.list"
  : >"$APTDIR/state/status"
  APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
    -o "Dir::Etc::sourceparts=$APTDIR/etc/sources.list.d"
    -o "Dir::Etc::preferencesparts=$APTDIR/etc/preferences.d"
    -o "Dir::State=$APTDIR/state"
    -o "Dir::State::lists=$APTDIR/state/lists"
    -o "Dir::State::status=$APTDIR/state/status"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
  )
  echo "install-services: fetching the bullseye package index (private apt config in $APTDIR)"
  apt-get -qq "${APT_OPTS[@]}" update
  (cd "$WORK" && apt-get -qq "${APT_OPTS[@]}" download consul)
  mv "$WORK"/consul_*.deb "$CACHE/debs/"
  unpack 'consul_*.deb' "$CACHE/consul"
fi

# --- Prometheus from the system suite (bookworm) ------------------------------------------
if [[ ! -x "$PROM_BIN" || ! -x "$PROMTOOL_BIN" ]]; then
  policy="$(apt-cache policy prometheus 2>/dev/null || true)"
  if [[ "$policy" != *"Candidate: "[0-9]* ]]; then
    echo "install-services: no prometheus candidate; running apt-get update"
    apt-get -qq update
  fi
  (cd "$WORK" && apt-get -qq -o "APT::Sandbox::User=root" download prometheus)
  mv "$WORK"/prometheus_*.deb "$CACHE/debs/"
  unpack 'prometheus_*.deb' "$CACHE/prometheus"
fi

for bin in "$CONSUL_BIN" "$PROM_BIN" "$PROMTOOL_BIN"; do
  [[ -x "$bin" ]] || { echo "install-services: $bin missing after unpacking" >&2; exit 1; }
done
"$CONSUL_BIN" version | head -n1
"$PROM_BIN" --version 2>&1 | head -n1
report
