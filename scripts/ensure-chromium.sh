#!/usr/bin/env bash
# Make a headless Chromium available for the report test (tests/test_reporting.py renders
# report.html in a real browser to prove it is self-contained and draws). Only `make test`
# needs it, never the demo or a deployment, so it is installed here rather than as a
# dependency. Debian's package is the source: PyPI has no Chromium, and a downloaded build
# would bypass the distribution's security updates.
set -euo pipefail
for candidate in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$candidate" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  exit 0
fi
echo "chromium not found and cannot install it (not root or no apt-get):" >&2
echo "install chromium (or google-chrome) with your package manager and run make again" >&2
exit 1
