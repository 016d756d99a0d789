#!/usr/bin/env bash
# Make a headless browser available for tests/browser: prints the path of `chromium` and exits 0.
# Installs Debian's chromium when it is missing (root only, like tests/slurm/slurm-up.sh does for
# slurm-wlm); otherwise prints the reason on stderr and exits 1.
set -euo pipefail

fail() {
    echo "chromium-up: $*" >&2
    exit 1
}

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null; then
        command -v "$name"
        exit 0
    fi
done
[ "$(id -u)" -eq 0 ] || fail "chromium is not installed and installing it needs root (uid $(id -u)): apt-get install chromium"
command -v apt-get >/dev/null || fail "chromium is not installed and there is no apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/tmp/chromium-up-apt.log 2>&1 || fail "apt-get update failed: $(tail -n 5 /tmp/chromium-up-apt.log)"
apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 chromium >>/tmp/chromium-up-apt.log 2>&1 ||
    fail "apt-get install chromium failed: $(tail -n 5 /tmp/chromium-up-apt.log)"
command -v chromium || fail "apt-get installed chromium but it is not on PATH"
