#!/usr/bin/env bash
# Installs every Debian package (and the npm Azurite emulator) that vfolderd's
# build, tests and demo need. Decides by package, not by command: a command can
# be on PATH from elsewhere while a package the build reads files from (the
# well-known protos of libprotobuf-dev) is missing. Idempotent; prints nothing
# when everything is there. Run as root.
#
#   build    gcc libc6-dev (the linker and crt files rustc needs), pkg-config,
#            protobuf-compiler + libprotobuf-dev (protoc and google/protobuf/*.proto
#            for etcd-client's build script), ca-certificates (crates.io over TLS)
#   tests    etcd-server etcd-client (a real etcd), rclone fuse3 (FUSE mounts of
#            blob containers), util-linux (unshare, findmnt), procps, iproute2,
#            npm + azurite (the Azure Blob emulator), runc + busybox-static
#            (tests/kernel.rs starts real containers on a busybox root),
#            prometheus (promtool: tests/operator.rs lints /metrics and tests the alert rules),
#            systemd (systemd-analyze verify on config/systemd/vfolderd.service; not run as init),
#            chromium + fonts-dejavu-core (tests/operator.rs renders the status page headless),
#            git (scripts/previous-release.sh builds the previous release from this
#            repository's history for tests/upgrade.rs)
set -euo pipefail

packages=(
  gcc libc6-dev pkg-config ca-certificates
  protobuf-compiler libprotobuf-dev
  etcd-server etcd-client
  rclone fuse3
  util-linux procps
  runc busybox-static
  btrfs-progs
  prometheus systemd
  chromium fonts-dejavu-core
  git
)

# Installed packages and what they provide, one name per line: nodesource's
# nodejs provides (and conflicts with) Debian's npm, so a provider counts.
have() {
  dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Provides}\n' 2>/dev/null |
    sed -e 's/([^)]*)//g' -e 's/,/ /g' |
    awk '$1 == "ii" { for (i = 2; i <= NF; i++) print $i }'
}

missing() {
  local installed
  installed=$(have | sort -u)
  for p in "$@"; do
    grep -qxF "$p" <<<"$installed" || echo "$p"
  done
}

apt_install() {
  echo "installing (apt): $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Packages with services (etcd-server, prometheus) are installed for their
  # binaries: no service is started (policy-rc.d, as in Debian's containers).
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
  fi
  local log
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "error: apt-get install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}

if [ "$(id -u)" != 0 ]; then
  mapfile -t need < <(missing "${packages[@]}" npm)
  if ((${#need[@]})); then
    echo "missing packages: ${need[*]}; run as root: scripts/install-deps.sh" >&2
    exit 1
  fi
  exit 0
fi

mapfile -t need < <(missing "${packages[@]}")
# A fresh Debian has no npm; a machine with nodesource's nodejs has it already.
command -v npm >/dev/null 2>&1 || mapfile -t -O "${#need[@]}" need < <(missing npm)
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi

if ! command -v azurite >/dev/null 2>&1; then
  echo "installing (npm): azurite" >&2
  if ! npm install -g --silent --no-fund --no-audit azurite >/dev/null 2>&1 || ! command -v azurite >/dev/null 2>&1; then
    echo "error: npm install -g azurite failed; the blob tests need the Azurite emulator" >&2
    exit 1
  fi
fi
