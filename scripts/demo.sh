#!/usr/bin/env bash
# The run command (README "Run it"): starts a local etcd if none answers on
# 127.0.0.1:2379, runs vfolderd with config/node.yaml, applies the example
# desired state (the seed's volumes, tmpfs stand-ins, a vfolder, a kernel),
# waits for the kernel to be Ready, and shows the status table and the mounts.
#
# By default everything happens in a private mount namespace, so the demo's
# mounts vanish when it ends; `--host` runs in the host's namespace instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "vfolderd mounts filesystems: run as root (sudo $0)" >&2
  exit 1
fi
if [ "${1:-}" != "--host" ] && [ -z "${VFOLDERD_DEMO_NS:-}" ]; then
  exec env VFOLDERD_DEMO_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi
scripts/install-deps.sh
cargo build --quiet
bin=target/debug/vfolderd
cfg=config/node.yaml
export ETCDCTL_API=3
etcdctl_() { etcdctl --endpoints=http://127.0.0.1:2379 "$@"; }
work=/tmp/vfolderd-demo
mkdir -p "$work"
if ! etcdctl_ endpoint health >/dev/null 2>&1; then
  echo "starting etcd (data in $work/etcd, log in $work/etcd.log)"
  etcd --name demo --data-dir "$work/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster demo=http://127.0.0.1:2380 >"$work/etcd.log" 2>&1 &
  etcd_pid=$!
  for _ in $(seq 100); do etcdctl_ endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
fi

echo "starting vfolderd (log in $work/vfolderd.log, metrics on http://127.0.0.1:9464/metrics)"
"$bin" run --config "$cfg" 2>"$work/vfolderd.log" &
vfolderd_pid=$!
cleanup() {
  kill -TERM "$vfolderd_pid" 2>/dev/null && wait "$vfolderd_pid" 2>/dev/null || true
  [ -n "${etcd_pid:-}" ] && kill "$etcd_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$bin" apply --config "$cfg" -f config/examples/seed-volumes.yaml
"$bin" apply --config "$cfg" -f config/examples/local-volumes.yaml
id=$("$bin" vfolder create --config "$cfg" --volume scratch-shard-1 --name mydata --owner alice)
echo "created vfolder $id"
sed "s/VFOLDER_UUID/$id/" config/examples/kernel.yaml | etcdctl_ put /vfolderd/nodes/node-1/kernels/demo-kernel >/dev/null
echo "put kernel demo-kernel; waiting for Ready..."
ready=
for _ in $(seq 300); do
  if etcdctl_ get --print-value-only /vfolderd/status/nodes/node-1/kernels/demo-kernel | grep -q '"state":"Ready"'; then
    ready=1
    break
  fi
  sleep 0.1
done
echo
"$bin" status --config "$cfg"
echo
echo "mounts made by vfolderd:"
findmnt -rn -o TARGET,FSTYPE,OPTIONS | grep /var/lib/vfolderd || true
echo
if [ -z "$ready" ]; then
  echo "demo-kernel did not become Ready in 30 s; vfolderd's log: $work/vfolderd.log" >&2
  tail -20 "$work/vfolderd.log" >&2
  exit 1
fi
if [ -t 0 ]; then
  echo "vfolderd is running (pid $vfolderd_pid). Try: ls /var/lib/vfolderd/kernels/demo-kernel/work"
  echo "Press Ctrl-C to stop; mounts stay in place on stop (and vanish with this namespace)."
  wait "$vfolderd_pid"
fi
