#!/usr/bin/env bash
# The test command (README "Run the tests"): installs what is missing, then
# runs the whole suite as root inside a private mount namespace, so the real
# tmpfs/bind mounts the end-to-end tests make never reach the host.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the tests mount filesystems: run as root (sudo $0)" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --all-targets --quiet
# The Debian package, built once here for a whole run (tests/operator.rs
# checks what it holds; the fresh-machine check installs it with dpkg -i).
skip=()
if [ $# -eq 0 ]; then
  VFOLDERD_DEB=$(scripts/package.sh)
  export VFOLDERD_DEB
  # The previous release, built from this repository's history, for
  # tests/upgrade.rs. A clone without that history cannot run the test: it
  # is skipped, said here and counted by no TOTAL.
  prev_status=0
  VFOLDERD_PREVIOUS=$(scripts/previous-release.sh) || prev_status=$?
  case $prev_status in
    0) export VFOLDERD_PREVIOUS ;;
    2)
      echo "WARNING: the previous release is not in this clone's history; tests/upgrade.rs is skipped" >&2
      skip=(-- --skip the_previous_release)
      ;;
    *)
      echo "error: scripts/previous-release.sh failed ($prev_status)" >&2
      exit 1
      ;;
  esac
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
unshare --mount --propagation private -- cargo test --no-fail-fast "$@" ${skip[@]+"${skip[@]}"} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The daemon tests of the mount table once more, with its fallback forced
# (/proc/self/mountinfo, for kernels before 6.8); not for a filtered run.
if [ $# -eq 0 ]; then
  echo "== again with mount_table: mountinfo (the fallback) =="
  VFOLDERD_TEST_MOUNT_TABLE=mountinfo unshare --mount --propagation private -- \
    cargo test --no-fail-fast --test e2e --test hardening 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
set -e
# One closing line for the whole suite (cargo prints one per test binary, the last being doc-tests).
awk '/^test result:/ {p += $4; f += $6} END {printf "TOTAL: %d passed, %d failed\n", p, f}' "$log"
exit "$status"
