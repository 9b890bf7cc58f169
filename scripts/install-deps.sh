#!/usr/bin/env bash
# Installs what vfolderd's build, tests and demo need, when missing:
# Debian etcd-server/etcd-client (a real etcd), protobuf-compiler (protoc for
# etcd-client), rclone and fuse3 (FUSE mounts of blob containers), and the
# Azurite emulator from npm. Idempotent; quiet when everything is there.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v rclone >/dev/null 2>&1 || need+=(rclone)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v azurite >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  echo "installing: azurite (npm)" >&2
  npm install -g --silent azurite >/dev/null 2>&1 || echo "warning: npm install azurite failed; blob tests need it" >&2
fi
