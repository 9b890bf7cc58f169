#!/usr/bin/env bash
# Builds vfolderd as it was at the previous release — the first round's last
# commit, before records could carry `trash`, `clone_of` or `uid` — from this
# repository's own history, for tests/upgrade.rs. Prints the binary's path.
# Cached under target/previous-release (rebuilt only for another commit).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${VFOLDERD_PREVIOUS_REV:-24dfd8080f14920f479d5bce309126ff019a60ea}
out="${CARGO_TARGET_DIR:-target}/previous-release"
bin="$out/target/debug/vfolderd"
if [ -x "$bin" ] && [ "$(cat "$out/rev" 2>/dev/null)" = "$rev" ]; then
  echo "$bin"
  exit 0
fi
if ! command -v git >/dev/null; then
  echo "git is not installed (scripts/install-deps.sh installs it)" >&2
  exit 1
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
  echo "previous release $rev is not in this clone's history (a shallow clone?)" >&2
  exit 2
fi
rm -rf "$out/src"
mkdir -p "$out/src"
git archive "$rev" | tar -x -C "$out/src"
echo "building the previous release ($rev) for tests/upgrade.rs" >&2
CARGO_TARGET_DIR="$out/target" cargo build --quiet --locked --bin vfolderd \
  --manifest-path "$out/src/Cargo.toml" >&2
echo "$rev" >"$out/rev"
echo "$bin"
