#!/usr/bin/env bash
# Builds the Debian package (target/debian/vfolderd_<version>-1_<arch>.deb) with
# cargo-deb from Cargo.toml's [package.metadata.deb]: the binary, the systemd
# unit (not enabled: an operator enables it once /etc/vfolderd/node.yaml is
# right), the example node config and the shipped policy (conffiles), and the
# docs, alert rules and dashboard under /usr/share/doc/vfolderd. Installs
# cargo-deb (crates.io) when it is missing. Prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing (cargo): cargo-deb" >&2
  cargo install --quiet --locked cargo-deb >&2
fi
out="${CARGO_TARGET_DIR:-target}/debian"
rm -rf "$out"
cargo deb --quiet --output "$out/" >&2
ls "$out"/*.deb
