#!/usr/bin/env bash
# Make tmux available for the live-view test (tests/test_live_view.py runs `batchctl run` in a
# real terminal and reads the screen back with capture-pane). Only `make test` needs it, so it
# is installed here, from Debian, as the report test's Chromium is.
set -euo pipefail
if command -v tmux >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing tmux with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tmux >/dev/null
  exit 0
fi
echo "tmux not found and cannot install it (not root or no apt-get):" >&2
echo "install tmux with your package manager and run make again" >&2
exit 1
