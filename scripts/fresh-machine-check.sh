#!/usr/bin/env bash
# Proves that the README's two commands work on a fresh Debian machine that
# has nothing but the Rust toolchain: builds a minimal Debian root with
# debootstrap (Debian's packages only), binds the host's Rust toolchain in
# (read-only; CARGO_HOME is a fresh writable directory inside), puts a fresh
# clone of this repository's HEAD inside, and runs, as root with that tree as
# its root (pivot_root) within a private mount namespace:
#
#     scripts/demo.sh </dev/null     (README "Run it")
#     scripts/test.sh                (README "Run the tests")
#
# Each step is printed; the last line is `fresh-machine-check: PASS` or
# `fresh-machine-check: FAIL (<step>)`. The debootstrap result is cached as
# target/fresh-machine/bookworm-minbase.tar (delete it to start from nothing).
# Needs root and the host's network (deb.debian.org, crates.io, npm).
#
#   scripts/fresh-machine-check.sh [--keep]     # --keep: leave the root for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if [ "$(id -u)" != 0 ]; then
  echo "the check builds a chroot and mounts inside it: run as root" >&2
  exit 1
fi
keep=${1:-}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=$repo/target/fresh-machine
tarball=$cache/$suite-minbase.tar
root=$cache/root
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
toolchain=$(rustup show active-toolchain 2>/dev/null | awk '{print $1}')
step=setup
started=$SECONDS

say() { printf '[fresh-machine-check %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
  say "FAILED at: $step"
  echo "fresh-machine-check: FAIL ($step)"
  exit 1
}
trap fail ERR

# The root lives in this script's own mount namespace: everything mounted into
# it vanishes with the namespace, even if the script is killed.
if [ -z "${FRESH_CHECK_NS:-}" ]; then
  exec env FRESH_CHECK_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi

step="debootstrap (host tool)"
if ! dpkg-query -W -f='${db:Status-Abbrev}' debootstrap 2>/dev/null | grep -q '^ii'; then
  say "installing debootstrap on the host"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

mkdir -p "$cache"
rm -rf "$root"
mkdir -p "$root"
if [ -f "$tarball" ]; then
  step="unpack cached root"
  say "unpacking the cached minimal $suite root ($tarball)"
  tar -xf "$tarball" -C "$root"
else
  step="debootstrap $suite"
  say "debootstrap --variant=minbase $suite from $mirror (cached afterwards)"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    { tail -20 "$cache/debootstrap.log"; false; }
  tar -cf "$tarball.tmp" -C "$root" . && mv "$tarball.tmp" "$tarball"
fi
say "fresh root: $(du -sh "$root" | cut -f1); packages: $(chroot "$root" dpkg-query -W | wc -l)"

step="prepare chroot"
# runc (pivot_root) wants the root to be a mount point of its own.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
# runc finds its cgroups through mountinfo.
mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmp "$root/tmp"
mount -t tmpfs run "$root/run"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The network's own trust, as any machine on this network is set up: where
# egress goes through a TLS-inspecting proxy, its CA is a local CA of the host
# (installed into the bundle when install-deps brings ca-certificates), and the
# host's CA-bundle variables point npm, cargo and curl at it.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
passthrough=()
for v in NODE_EXTRA_CA_CERTS SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE GIT_SSL_CAINFO \
  http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!v:-}" ] && passthrough+=("$v=${!v}")
done
# The Rust toolchain, and nothing else from the host: rustup's proxies and the
# toolchain read-only; a fresh, empty, writable CARGO_HOME for the registry.
mkdir -p "$root/opt/rustup" "$root/opt/cargo/bin" "$root/root/.cargo"
mount --bind -o ro "$rustup_home" "$root/opt/rustup"
mount --bind -o ro "$cargo_bin" "$root/opt/cargo/bin"
say "toolchain $toolchain bound in read-only; CARGO_HOME is empty"

step="fresh clone"
git clone --quiet --no-local "$repo" "$root/root/vfolderd"
say "cloned HEAD $(git -C "$repo" rev-parse --short HEAD) into /root/vfolderd"

# Runs $1 in the fresh root as its real root: pivot_root in a mount namespace
# of its own, then the host's tree is detached. Not chroot: a chrooted process
# may not create user namespaces (clone(2): EPERM), which idmapped binds need,
# and a real machine is not chrooted either.
in_root() {
  unshare --mount --propagation private -- /bin/sh -s "$root" "$1" "$toolchain" "${passthrough[@]}" <<'PIVOT'
set -e
root=$1; cmd=$2; toolchain=$3; shift 3
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
exec /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/root/.cargo/bin:/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo RUSTUP_TOOLCHAIN="$toolchain" \
  "$@" bash -c "cd /root/vfolderd && $cmd" </dev/null
PIVOT
}

step="sanity: a fresh machine lacks protoc"
if in_root 'command -v protoc >/dev/null'; then false; fi
say "as on a fresh machine: no protoc, no etcd, no npm"

step="README: scripts/demo.sh"
say "running: scripts/demo.sh </dev/null (as root, no sudo)"
in_root 'scripts/demo.sh </dev/null' >"$cache/demo.log" 2>&1 || { tail -40 "$cache/demo.log"; false; }
grep -q 'demo-kernel' "$cache/demo.log" || { tail -40 "$cache/demo.log"; false; }
sed -n '/^NODE\|^KIND\|kernel\/demo-kernel/p' "$cache/demo.log" | head -5
say "demo done (log: $cache/demo.log)"

step="README: scripts/test.sh"
say "running: scripts/test.sh (as root, no sudo)"
in_root 'scripts/test.sh' >"$cache/test.log" 2>&1 || { grep -E '^test .*FAILED|^TOTAL|panicked' "$cache/test.log" | head -40; false; }
grep '^TOTAL' "$cache/test.log"
say "tests done (log: $cache/test.log)"

step="the Debian package: dpkg -i, then its binary by hand"
say "installing the package scripts/test.sh built (target/debian/) with dpkg -i"
in_root 'dpkg -i target/debian/vfolderd_*.deb && cd / && vfolderd --version &&
  vfolderd get --help | grep -q "Example: vfolderd get" &&
  systemd-analyze verify /lib/systemd/system/vfolderd.service &&
  test -f /etc/vfolderd/policies/default.yaml' >"$cache/package.log" 2>&1 ||
  { tail -20 "$cache/package.log"; false; }
grep '^vfolderd ' "$cache/package.log"
say "package installed and run (log: $cache/package.log)"

if [ "$keep" != --keep ]; then
  # Unmount first: /dev and the toolchain are bound in, and must not be deleted through the root.
  umount -R -l "$root"
  rm -rf --one-file-system "$root"
fi
trap - ERR
say "both README commands passed on a fresh $suite root"
echo "fresh-machine-check: PASS"
